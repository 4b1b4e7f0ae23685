"""One worker's OS process: spawn in its own process group, watch its exit, relay its stderr, stop it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from protocol.messages import START_TIME_SLACK_S
from supervisor import logs
from supervisor.config import ModelConfig
from supervisor.workers import workerenv
from supervisor.workers.classify import exit_details

STDERR_TAIL_LINES = 200
ADOPTED_POLL_S = 0.02


class AdoptionRefused(Exception):
    pass


class WorkerProcess:
    """Owns one worker's OS process: the Popen (or, for a worker adopted from a previous supervisor
    run, a psutil handle), the death pipe, the stderr relay and the exit watch. `stop()` is
    idempotent."""

    def __init__(
        self,
        model: ModelConfig,
        endpoint: str,
        token: str,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[["WorkerProcess", int | None], None],
        log_dir: Path | None = None,
        hub_downloads: bool = False,
        spare: bool = False,
        handshake_timeout_s: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self._env = dict(env or {})  # beside the LMX_* variables: a group rank's MLX_* ones
        self._hub_downloads = hub_downloads
        self._spare = spare  # a warm spare: imports mlx-lm before its hello, gets a model later
        self._handshake_timeout_s = handshake_timeout_s
        self.token = token
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.returncode: int | None = None
        self.start_time: float | None = None
        self.adopted = False
        self._endpoint = endpoint
        self._log_dir = log_dir
        self._loop = loop
        self._on_exit = on_exit
        self._exited = asyncio.Event()
        self._death_w: int | None = None
        self._proc: subprocess.Popen | None = None
        self._ps: psutil.Process | None = None
        self.log = logs.get(model=model.id)

    def assign(self, model: ModelConfig, on_exit: Callable[["WorkerProcess", int | None], None]) -> None:
        """A warm spare becomes this model's worker: its exit and its log lines are the model's now."""
        self.model, self._on_exit, self._spare = model, on_exit, False
        self.log = logs.get(model=model.id, worker_pid=self.pid)

    @property
    def pid(self) -> int | None:
        return self._ps.pid if self._ps else None

    def adopt(self, pid: int, start_time: float) -> None:
        """Take over a worker a previous supervisor run spawned. pid *and* start time must match,
        so a stranger that reused the pid is never touched."""
        try:
            ps = psutil.Process(pid)
            if abs(ps.create_time() - start_time) > START_TIME_SLACK_S:
                raise AdoptionRefused(f"pid {pid} was reused by another process")
            if ps.status() == psutil.STATUS_ZOMBIE:
                raise AdoptionRefused(f"pid {pid} has exited")
        except psutil.Error as exc:
            raise AdoptionRefused(f"pid {pid} is gone: {exc}") from None
        self._ps, self.start_time, self.adopted = ps, start_time, True
        self.log = logs.get(model=self.model.id, worker_pid=pid)
        threading.Thread(target=self._wait_adopted, name=f"wait-{self.model.id}", daemon=True).start()

    def _wait_adopted(self) -> None:
        # Not our child: nothing to wait on, so poll. Its exit status is unknowable, and where
        # nobody reaps orphans (a container's pid 1) an exited worker lingers as a zombie.
        while self._ps_running():
            time.sleep(ADOPTED_POLL_S)
        self._loop.call_soon_threadsafe(self._exited_cb, None)

    def _ps_running(self) -> bool:
        try:
            return self._ps is not None and self._ps.is_running() and self._ps.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def spawn(self) -> None:
        # The worker holds the read end; we hold the write end. When this process dies for any
        # reason the kernel closes it and the worker sees EOF at once (Linux and macOS alike).
        death_r, self._death_w = os.pipe()
        # An allow-list of ours, never os.environ whole: the supervisor's secrets stay here.
        env = workerenv.build(os.environ, dict(
            LMX_WORKER_ENDPOINT=self._endpoint,
            LMX_WORKER_TOKEN=self.token,
            LMX_MODEL_ID=self.model.id,
            LMX_DEATH_FD=str(death_r),
            LMX_WORKER_HANDSHAKE_TIMEOUT_S=str(self._handshake_timeout_s),
            PYTHONUNBUFFERED="1",
        ), self._hub_downloads)
        if self._log_dir is not None:
            env["LMX_WORKER_LOG_DIR"] = str(self._log_dir)
        if self._spare:
            env["LMX_WORKER_SPARE"] = "1"
        env.update(self._env)
        cmd = list(self.model.worker_command or (sys.executable, "-m", "worker"))
        try:
            self._proc = subprocess.Popen(
                cmd, env=env, pass_fds=(death_r,), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            os.close(death_r)
        self._ps = psutil.Process(self._proc.pid)
        self.start_time = self._ps.create_time()
        self.log = logs.get(model=self.model.id, worker_pid=self._proc.pid)
        self.log.info("worker.spawned", command=cmd)
        reader = threading.Thread(target=self._relay_output, name=f"stderr-{self.model.id}", daemon=True)
        reader.start()
        threading.Thread(target=self._wait, args=(reader,), name=f"wait-{self.model.id}", daemon=True).start()

    def _relay_output(self) -> None:
        assert self._proc and self._proc.stdout
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_tail.append(line)
            self._log_line(line)

    def _log_line(self, line: str) -> None:
        record = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            event = record.pop("event")
            level = str(record.pop("level", "info"))
            record.pop("ts", None)
            record = {k if k not in ("model", "worker_pid") else f"worker_{k}": v for k, v in record.items()}
            getattr(self.log, level if level in ("debug", "info", "warning", "error") else "info")(event, **record)
        else:
            self.log.info("worker.output", line=line)

    def _wait(self, reader: threading.Thread) -> None:
        assert self._proc
        rc = self._proc.wait()
        # The last lines a dying worker printed explain its death: let the relay drain them first.
        reader.join(timeout=0.5)
        self._loop.call_soon_threadsafe(self._exited_cb, rc)

    def _exited_cb(self, rc: int | None) -> None:
        self.returncode = rc
        if self._death_w is not None:
            os.close(self._death_w)
            self._death_w = None
        self._exited.set()
        self.log.info("worker.exited", **exit_details(rc))
        self._on_exit(self, rc)

    @property
    def alive(self) -> bool:
        if self._exited.is_set() or self._ps is None:
            return False
        if self._proc is not None:
            # Popen.returncode is set the moment the waiter thread reaps the child, before our callback.
            return self._proc.returncode is None
        return self._ps_running()  # psutil compares the start time too: pid reuse is not "running"

    async def wait_exit(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def signal_group(self, sig: int) -> None:
        if not self.alive or self._ps is None:
            return
        try:
            os.killpg(self._ps.pid, sig)  # its own session: the process group id is its pid
        except ProcessLookupError:
            pass

    async def stop(self, reason: str, timeout_s: float, ask: Callable[[], None] | None = None) -> None:
        """The stop ladder: ask over the socket -> SIGTERM -> SIGKILL of the process group.
        Each rung waits `timeout_s`; each is logged with its reason."""
        if not self.alive:
            return
        if ask is not None:
            self.log.info("worker.stop", step="ask", reason=reason)
            ask()
            if await self.wait_exit(timeout_s):
                return
        self.log.warning("worker.stop", step="sigterm", reason=reason)
        self.signal_group(signal.SIGTERM)
        if await self.wait_exit(timeout_s):
            return
        self.log.warning("worker.stop", step="sigkill", reason=reason)
        self.signal_group(signal.SIGKILL)
        await self.wait_exit(timeout_s)
