"""A supervisor starting while another process holds its store locked (issue 16, item 2): it waits
for the lock up to store_lock_wait_s and starts on the real store, or refuses to start with exit 75,
and never takes the locked store for a corrupt one: a quarantine survives either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO
from tests.test_chaos import chaos
from tests.test_store_guard import Locker, rows

pytestmark = pytest.mark.timeout(180)

# Holds BEGIN EXCLUSIVE until the supervisor's log says one more time that it is waiting for it.
RELEASE_WHEN_WAITED = """
import sqlite3, sys, time
from pathlib import Path
log = Path(sys.argv[2])
seen = lambda: log.read_text().count('"store.lock_waiting"') if log.exists() else 0
before = seen()
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
deadline = time.monotonic() + 60
while seen() == before and time.monotonic() < deadline:
    time.sleep(0.05)
db.execute("COMMIT")
sys.exit(0 if seen() > before else 1)
"""


def test_a_locked_store_is_waited_for_or_refused_never_replaced(make_supervisor, tiny_model: Path) -> None:
    crashing = {"id": "bad", "path": str(tiny_model), "worker_command": chaos("--at", "load", "--signal", "SIGBUS")}
    models = [crashing, {"id": "good", "path": str(tiny_model)}]
    restart = {"quarantine_after": 2, "backoff_initial_s": 0.05}
    sup = make_supervisor(models, restart=restart, supervisor={"store_lock_wait_s": 1.0}).start(wait_ready=False)
    sup.wait_model("bad", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    sup.wait_model("good", lambda m: m["state"] == "READY", 60, "READY")
    assert sup.stop() == 0
    store = sup.state_dir / "store.sqlite3"
    boots = rows(store, "SELECT count(*) FROM boots")

    # Locked past the bound: exit 75 (launchd/systemd try again), a message that says why, the store untouched.
    locker = Locker(store)
    try:
        run = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(sup.config_path),
                              "--state-dir", str(sup.state_dir)], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    finally:
        locker.release()
    assert run.returncode == 75, run.stderr[-2000:]
    assert "refusing to start" in run.stderr and "locked" in run.stderr
    (refused,) = sup.events("store.unavailable")
    assert refused["reason"] == "locked" and refused["level"] == "critical"
    assert not list(sup.state_dir.glob("store.sqlite3.corrupt-*"))
    assert not (sup.state_dir / "control.sock").exists()
    assert rows(store, "SELECT count(*) FROM boots") == boots  # it never started
    assert rows(store, "SELECT quarantined FROM models WHERE model='bad'") == [(1,)]

    # Locked for a while, within the bound: it waits, then starts on the real store.
    sup.rewrite(models, restart=restart, supervisor={"store_lock_wait_s": 60.0})
    log = sup.state_dir / "logs" / "supervisor.log"
    holder = subprocess.Popen([sys.executable, "-c", RELEASE_WHEN_WAITED, str(store), str(log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        sup.start(wait_ready=False)
        assert holder.wait(timeout=60) == 0  # it saw the supervisor wait, and then let go
    finally:
        if holder.poll() is None:
            holder.kill()
    bad = sup.wait_model("bad", lambda m: m["state"] == "QUARANTINED", 30, "still QUARANTINED")
    sup.wait_model("good", lambda m: m["state"] == "READY", 60, "READY")
    assert bad["quarantined"] and bad["last_error"]["code"] == "MODEL_QUARANTINED"
    assert [e["code"] for e in sup.client.history("bad")] == ["WORKER_CRASHED"] * 2  # nothing lost
    (waited,) = sup.events("store.lock_waited")
    assert waited["waited_s"] > 0
    assert not list(sup.state_dir.glob("store.sqlite3.corrupt-*"))
    status = sup.status()["supervisor"]
    assert status["store_degraded"] is False and status["store_schema_version"] >= 2
