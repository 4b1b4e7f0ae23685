"""The daemon's own life: SIGTERM drains and exits 0, orphans die, bad config and double start refused."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path


from protocol.client import SupervisorClient
from tests.harness import REPO, process_gone, wait_until


def test_sigterm_drains_in_flight_streams_then_exits_0_with_no_worker_left(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}]).start()
    pids = [m["worker_pid"] for m in sup.status()["models"]]

    async def stream_through_shutdown() -> tuple[object, int]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate("a", "Hello", max_tokens=300)
            chunks = tokens = 0
            async for chunk in stream:
                chunks += 1
                tokens += chunk.tokens  # a slow reader gets chunks coalesced: count tokens, not chunks
                if chunks == 2:
                    sup.proc.send_signal(signal.SIGTERM)
            return stream.result, tokens

    result, tokens = asyncio.run(stream_through_shutdown())
    assert result is not None and result.usage["completion_tokens"] == tokens == 300
    assert sup.proc.wait(timeout=30) == 0
    for pid in pids:
        assert process_gone(pid), f"worker {pid} outlived a clean shutdown"
    events = [e["event"] for e in sup.events()]
    assert events.index("supervisor.draining") < events.index("supervisor.stopped")


def test_workers_of_a_sigkilled_supervisor_exit_after_orphan_grace(make_supervisor, tiny_model: Path) -> None:
    grace_s = 2.0
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}], supervisor={"orphan_grace_s": grace_s}).start()
    pid = sup.model("a")["worker_pid"]
    sup.proc.kill()
    sup.proc.wait()
    killed = time.monotonic()
    assert not process_gone(pid)  # inside the grace window a restarted supervisor could still adopt it
    wait_until(lambda: process_gone(pid), grace_s + 5, "the orphaned worker to exit")
    assert time.monotonic() - killed >= grace_s * 0.9


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_broken_config_is_refused_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[supervisor]\nheartbeat_interval_s = 'fast'\n")
    out = _run_cli("supervisor.cli", "run", "--config", str(bad), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 78
    assert f"{bad}: supervisor.heartbeat_interval_s: expected a number" in out.stderr


def test_a_second_supervisor_on_the_same_state_dir_is_refused(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)
    out = _run_cli("supervisor.cli", "run", "--config", str(sup.config_path), "--state-dir", str(sup.state_dir))
    assert out.returncode == 1 and "another supervisor holds" in out.stderr
    assert sup.status()["supervisor"]["pid"] == sup.proc.pid  # the first one is untouched


def test_state_dir_and_sockets_are_private(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)
    assert sup.state_dir.stat().st_mode & 0o777 == 0o700
    for name in ("control.sock", "workers.sock"):
        assert (sup.state_dir / name).stat().st_mode & 0o777 == 0o600


def test_lmxctl_status_generate_and_exit_codes(make_supervisor, tiny_model: Path, tmp_path: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}]).start()
    sd = str(sup.state_dir)
    status = _run_cli("lmxctl", "--state-dir", sd, "status", "--json")
    assert status.returncode == 0
    model = json.loads(status.stdout)["models"][0]
    assert (model["id"], model["state"]) == ("a", "READY") and model["worker_pid"]
    table = _run_cli("lmxctl", "--state-dir", sd, "status")
    assert table.returncode == 0 and "READY" in table.stdout and model["revision"] in table.stdout
    gen = _run_cli("lmxctl", "--state-dir", sd, "generate", "a", "Hello", "--max-tokens", "5", "--json")
    assert gen.returncode == 0
    body = json.loads(gen.stdout)
    assert body["usage"]["completion_tokens"] >= 1 and "text" in body
    err = _run_cli("lmxctl", "--state-dir", sd, "generate", "nope", "Hello", "--json")
    assert err.returncode == 1
    assert json.loads(err.stdout)["error"]["code"] == "UNKNOWN_MODEL"
    gone = _run_cli("lmxctl", "--state-dir", str(tmp_path / "nothing"), "status", "--json")
    assert gone.returncode == 3
    assert json.loads(gone.stdout)["error"]["code"] == "SUPERVISOR_UNAVAILABLE"


def test_client_of_a_supervisor_that_dies_gets_a_typed_error_not_a_hang(make_supervisor, tiny_model: Path) -> None:
    from protocol import errors as E

    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}], supervisor={"orphan_grace_s": 1.0}).start()
    pid = sup.model("a")["worker_pid"]

    async def stream_while_supervisor_dies() -> Exception:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            seen = 0
            try:
                async for _ in client.generate("a", "Hello", max_tokens=1500):
                    seen += 1
                    if seen == 2:
                        sup.proc.kill()
            except E.LmxError as exc:
                return exc
        raise AssertionError("stream ended without an error")

    exc = asyncio.run(asyncio.wait_for(stream_while_supervisor_dies(), 20))
    assert isinstance(exc, E.SupervisorUnavailable)
    sup.proc.wait()
    wait_until(lambda: process_gone(pid), 10, "the orphaned worker to exit")


def test_a_crash_looping_supervisor_starts_in_safe_mode_until_a_clean_shutdown(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}],
                          supervisor={"crash_loop_starts": 2, "crash_loop_window_s": 600.0}).start()
    pid = sup.model("a")["worker_pid"]
    sup.proc.kill()
    sup.proc.wait()
    wait_until(lambda: process_gone(pid), 15, "the orphaned worker to exit")
    sup.start(wait_ready=False)  # second start without a clean shutdown in between
    status = sup.status()
    assert status["supervisor"]["safe_mode"] is True
    assert status["models"][0]["state"] == "UNLOADED"  # nothing started by itself
    assert sup.events("supervisor.safe_mode")
    assert sup.stop() == 0
    sup.start()  # after a clean shutdown: normal again, the model autoloads
    assert sup.status()["supervisor"]["safe_mode"] is False
