"""A real supervisor process for tests: config writer, start/stop, waits with deadlines (a model's
state through the events socket, SupervisorClient.wait_state; anything else by polling)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.syncclient import SyncSupervisorClient

REPO = Path(__file__).resolve().parents[1]
# wait_model re-reads the status this often between state events: what its predicates read beside
# the state (active requests, cache figures, lkg_revision) changes without one.
RECHECK_S = 0.1


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def render_config(models: list[dict], sections: dict[str, dict]) -> str:
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for model in models:
        lines.append("[[models]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in model.items() if not isinstance(v, dict)]
        for name, table in model.items():  # [models.canary], [models.group]
            if isinstance(table, dict) and table:
                lines.append(f"[models.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def process_gone(pid: int) -> bool:
    """Exited (or a zombie nobody reaped yet); a pid reaped between two checks counts as gone."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def workers_of(state_dir: Path) -> set[int]:
    """Every live worker process serving this state dir, whoever its parent is."""
    endpoint = f"ipc://{state_dir / 'workers.sock'}"
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "worker" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("LMX_WORKER_ENDPOINT") == endpoint and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


# Fast defaults for tests: quick heartbeats, short grace periods, a tiny canary.
TEST_SUPERVISOR = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 5.0, "orphan_grace_s": 5.0,
                   "drain_grace_s": 10.0, "stop_timeout_s": 3.0}
TEST_RESTART = {"backoff_initial_s": 0.2, "backoff_max_s": 2.0}


class RunningSupervisor:
    def __init__(self, root: Path, models: list[dict], supervisor: dict | None = None,
                 restart: dict | None = None) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.config_path = root / "lmx.toml"
        self.stderr_path = root / "supervisor.stderr"
        root.mkdir(parents=True, exist_ok=True)
        sections = {"supervisor": {**TEST_SUPERVISOR, **(supervisor or {})},
                    "restart": {**TEST_RESTART, **(restart or {})}}
        self.config_path.write_text(render_config(models, sections))
        self.models = models
        self.proc: subprocess.Popen | None = None
        self._client: SyncSupervisorClient | None = None
        self.known_worker_pids: set[int] = set()

    def rewrite(self, models: list[dict], supervisor: dict | None = None, restart: dict | None = None) -> None:
        sections = {"supervisor": {**TEST_SUPERVISOR, **(supervisor or {})},
                    "restart": {**TEST_RESTART, **(restart or {})}}
        self.config_path.write_text(render_config(models, sections))

    def start(self, wait_ready: bool = True, timeout_s: float = 60.0) -> "RunningSupervisor":
        if self._client is not None:  # a client of a previous (killed) run of this supervisor
            self._client.close()
            self._client = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "run", "--config", str(self.config_path),
             "--state-dir", str(self.state_dir)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.stderr_path, "ab"),
        )
        wait_until(lambda: (self.state_dir / "control.sock").exists() or self.proc.poll() is not None,
                   15, "the control socket")
        assert self.proc.poll() is None, f"supervisor exited: {self.stderr_path.read_text()[-2000:]}"
        if wait_ready:
            # A killed run's socket file is there before this run binds it (a busy machine can take
            # longer than a connect's timeout to get there): it counts once this run answers.
            wait_until(lambda: self._answers() or self.proc.poll() is not None, timeout_s, "the supervisor answering")
            assert self.proc.poll() is None, f"supervisor exited: {self.stderr_path.read_text()[-2000:]}"
            self.wait_all_ready(timeout_s)
        return self

    def _answers(self) -> bool:
        try:
            self.status()
            return True
        except E.SupervisorUnavailable:
            return False

    @property
    def client(self) -> SyncSupervisorClient:
        if self._client is None:
            self._client = SyncSupervisorClient(state_dir=self.state_dir, timeout_s=120.0)
        return self._client

    def status(self) -> dict:
        return self.client.status()

    def model(self, model_id: str) -> dict:
        return next(m for m in self.status()["models"] if m["id"] == model_id)

    def wait_all_ready(self, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:  # until one status has them all READY: one may fail while another comes up
            status = self.status()
            self._remember(status)
            waiting = [m["id"] for m in status["models"] if m["state"] != "READY"]
            if not waiting:
                return status
            self._wait_state(waiting[0], lambda m: m["state"] == "READY", max(0.0, deadline - time.monotonic()),
                             timeout_s, "every model READY", None)

    def wait_model(self, model_id: str, predicate: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        return self._wait_state(model_id, predicate, timeout_s, timeout_s, f"{model_id}: {what}", RECHECK_S)

    def _wait_state(self, model_id: str, predicate: Callable[[dict], bool], timeout_s: float, shown_s: float,
                    what: str, recheck_s: float | None) -> dict:
        def check(m: dict) -> bool:
            if m.get("worker_pid"):
                self.known_worker_pids.add(m["worker_pid"])
            return bool(predicate(m))

        extra = {} if recheck_s is None else {"recheck_s": recheck_s}
        try:
            return self.client.wait_state(model_id, check, timeout_s, **extra)
        except E.RequestTimeout:
            raise AssertionError(f"timed out after {shown_s}s waiting for {what}") from None

    def _remember(self, status: dict) -> None:
        self.known_worker_pids.update(m["worker_pid"] for m in status["models"] if m["worker_pid"])

    def events(self, name: str | None = None) -> list[dict]:
        path = self.state_dir / "logs" / "supervisor.log"
        out = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if name is None or record.get("event") == name:
                out.append(record)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self._client is not None:
            self._client.close()
            self._client = None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def cleanup(self) -> None:
        """Teardown: the supervisor stopped, and never a worker left behind, whatever the test did."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = {pid for pid in self.known_worker_pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE} | workers_of(self.state_dir)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"workers outlived their supervisor: {leftovers}"


def kill_mid_request(sup: RunningSupervisor, model: str, request: Callable[[SupervisorClient], Awaitable[Any]],
                     beside: str, *, stop_first: bool = False) -> tuple[BaseException | None, Any]:
    """`request` sent to `model`, its worker SIGKILLed once the supervisor has put it in that
    worker's hands (`stop_first`: SIGSTOPped before it is sent, for a model that would answer
    before any kill landed); then a completion of `beside`. (The request's error, that completion.)"""
    victim = sup.model(model)["worker_pid"]

    async def scenario() -> tuple[BaseException | None, Any]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            if stop_first:
                os.kill(victim, signal.SIGSTOP)
            job = asyncio.ensure_future(request(client))
            async with asyncio.timeout(10):  # until the supervisor has put it on the worker
                while not [m for m in (await client.status())["models"] if m["id"] == model and m["active"]]:
                    await asyncio.sleep(0.01)
            assert not job.done()
            os.kill(victim, signal.SIGKILL)
            err = None
            try:
                await job
            except E.LmxError as exc:
                err = exc
            return err, await client.complete(beside, "Hello", max_tokens=3)

    return asyncio.run(scenario())
