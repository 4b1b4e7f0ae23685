"""A store that cannot be written while the supervisor serves (issue 16, item 3): another process
holds it locked while a worker is killed from outside, twice. The stream in flight fails at once,
the model restarts, then quarantines, without waiting on the disk; status and metrics say
store_degraded; once the lock goes, everything reaches the store and survives a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol import errors as E
from tests.harness import REPO, wait_until
from tests.test_store_guard import Locker, rows

pytestmark = pytest.mark.timeout(240)


def _kill_mid_stream(sup, pid: int) -> float:
    """SIGKILL the worker while a stream is running; returns how long the client waited for its error."""
    stream = sup.client.generate("m", "Tell me a long story.", max_tokens=5000)
    next(stream)
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(E.WorkerCrashed):
        for _ in stream:
            pass
    return time.monotonic() - start


def test_a_locked_store_while_serving_fails_nothing_and_loses_nothing(make_supervisor, tiny_model: Path) -> None:
    restart = {"quarantine_after": 2, "backoff_initial_s": 0.05, "window_s": 600}
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}], restart=restart).start()
    store = sup.state_dir / "store.sqlite3"
    first = sup.model("m")["worker_pid"]
    locker = Locker(store)
    try:
        assert _kill_mid_stream(sup, first) < 3.0
        m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] not in (None, first), 60,
                           "READY again on a new worker, store locked")
        status = sup.status()["supervisor"]
        assert status["store_degraded"] and status["store_pending_writes"] > 0
        assert "locked" in status["store_error"]
        assert "lmx_store_degraded 1.0" in sup.client.metrics()
        table = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "status"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and "STORE DEGRADED" in table.stdout
        assert m["failures_in_window"] == 1  # counted from memory: the row is not written yet
        assert _kill_mid_stream(sup, m["worker_pid"]) < 3.0
        q = sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 30, "QUARANTINED, store locked")
        assert q["failures_in_window"] == 2 and len(sup.client.history("m")) == 2
        assert rows(store, "SELECT count(*) FROM crashes") == [(0,)]  # nothing on disk yet
        (degraded,) = sup.events("store.degraded")
        assert degraded["level"] == "error"
    finally:
        locker.release()
    wait_until(lambda: not sup.status()["supervisor"]["store_degraded"], 30, "the store to recover")
    assert "lmx_store_degraded 0.0" in sup.client.metrics()
    assert rows(store, "SELECT quarantined FROM models WHERE model='m'") == [(1,)]
    assert rows(store, "SELECT code, counted FROM failures") == [("WORKER_CRASHED", 1)] * 2
    assert rows(store, "SELECT count(*) FROM crashes WHERE model='m'") == [(2,)]
    assert sup.events("store.recovered")
    # What was acknowledged while degraded survives the supervisor.
    assert sup.stop() == 0
    sup.start(wait_ready=False)
    again = sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 30, "QUARANTINED after a restart")
    assert again["failures_in_window"] == 2 and [r["code"] for r in sup.client.history("m")] == ["WORKER_CRASHED"] * 2
