"""The store against its disk, without a supervisor: a lock held by another process is not
corruption, writes that fail wait in order and lose nothing, the schema migrates forward and
refuses a newer one, and history is pruned. Locks come from a real second process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.config import ModelConfig
from supervisor.persistence import storeguard
from supervisor.persistence.records import CrashRecord, Failure
from supervisor.persistence.store import Retention, Store, STORE_FILE
from supervisor.persistence.storeguard import StoreUnavailable

pytestmark = pytest.mark.timeout(60)

# Holds BEGIN EXCLUSIVE on the store until its stdin closes (or for hold_s when given).
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"""


class Locker:
    """Another process holding the store's write lock, as a backup tool or an sqlite3 shell would."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


def rows(path: Path, sql: str) -> list[tuple]:
    """What the store file holds, read by a connection of its own (as another process would)."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_a_locked_store_is_waited_for_then_refused_and_never_moved_aside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_quarantine("m", {"failures": 3, "message": "3 failures"})
    store.close()
    locker = Locker(tmp_path / STORE_FILE)
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            Store(tmp_path, lock_wait_s=0.5)
        waited = time.monotonic() - start
    finally:
        locker.release()
    assert caught.value.reason == "locked" and 0.5 <= waited < 5
    assert not list(tmp_path.glob("*.corrupt-*"))
    # The real store, as it was: the quarantine is still there.
    reopened = Store(tmp_path, lock_wait_s=1.0)
    assert reopened.flags("m").quarantined
    reopened.close()


def test_only_sqlites_verdict_makes_a_store_corrupt(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).write_bytes(b"this is not a database" * 100)
    store = Store(tmp_path)
    (aside,) = tmp_path.glob(f"{STORE_FILE}.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    assert not store.flags("m").quarantined
    store.close()


def test_full_read_only_and_locked_are_told_apart_from_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t(x)")
    db.execute("PRAGMA max_page_count=2")  # a disk that is full, for this connection
    with pytest.raises(sqlite3.Error) as full:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 4000,))
    db.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as readonly:
        ro.execute("INSERT INTO t VALUES (1)")
    ro.close()
    for exc, reason in ((full.value, "disk full"), (readonly.value, "read-only")):
        assert storeguard.reason_of(exc) == reason
        assert not storeguard.is_corrupt(exc) and storeguard.is_transient(exc)


def test_writes_that_fail_wait_in_order_and_nothing_is_lost(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_wanted("m", True, "r1", "r1")
    locker = Locker(tmp_path / STORE_FILE)
    try:
        start = time.monotonic()
        store.add_failure("m", Failure(100.0, "r1", "WORKER_CRASHED", True))
        took = time.monotonic() - start
        store.add_crash(CrashRecord("m", "r1", 100.0, "WORKER_CRASHED", signal="SIGKILL"))
        store.set_quarantine("m", {"failures": 1, "message": "quarantined"})
        store.set_wanted("m", True, "r1", "r1")
        store.set_wanted("m", False, "r1", "r1")  # the later write must win when both land
        store.set_alias("a", "m")
        good = ModelConfig(id="m", path="/models/m", context_tokens=2048)
        store.set_lkg(good)
        assert store.degraded and store.health()["store_pending_writes"] == 8  # lkg: revision + flag
        assert took < 0.5  # the caller (the event loop) did not wait on the lock
        # What decides safety reads what was written, queued or not.
        assert store.flags("m").quarantined and store.flags("m").wanted is False
        assert [f.code for f in store.failures("m", 0.0)] == ["WORKER_CRASHED"]
        assert store.crash_records("m")[0].signal == "SIGKILL"
        assert store.flags("m").lkg_revision == good.revision
        assert store.revision("m", good.revision) == good  # a rollback target, before it is on disk
        assert not rows(tmp_path / STORE_FILE, "SELECT * FROM crashes")
    finally:
        locker.release()
    assert store.writes.flush() and not store.degraded
    path = tmp_path / STORE_FILE
    assert rows(path, "SELECT quarantined, wanted FROM models WHERE model='m'") == [(1, 0)]
    assert rows(path, "SELECT code FROM failures") == [("WORKER_CRASHED",)]
    assert rows(path, "SELECT signal FROM crashes") == [("SIGKILL",)]
    assert rows(path, "SELECT old, new FROM aliases") == [("a", "m")]
    assert rows(path, "SELECT lkg_revision FROM models WHERE model='m'") == [(good.revision,)]
    assert rows(path, "SELECT revision FROM revisions") == [(good.revision,)]
    assert len(store.failures("m", 0.0)) == 1 and len(store.crash_records("m")) == 1  # no double count
    store.close()


def test_an_unversioned_store_migrates_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(storeguard.MIGRATIONS[0])  # a store from before schema versions
    db.execute("INSERT INTO models(model, quarantined) VALUES ('m', 1)")
    db.close()
    store = Store(tmp_path)
    assert store.flags("m").quarantined
    store.close()
    assert rows(path, "PRAGMA user_version") == [(storeguard.SCHEMA_VERSION,)]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version={storeguard.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreUnavailable) as caught:
        Store(tmp_path)
    assert "newer" in caught.value.detail and path.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_history_is_pruned_by_age_and_count_but_not_inside_the_window(tmp_path: Path) -> None:
    store = Store(tmp_path)
    now = time.time()
    for i in range(30):
        at = now - 86400 * 40 if i < 5 else now - i
        store.add_failure("m", Failure(at, "r", "WORKER_CRASHED", True))
        store.add_crash(CrashRecord("m", "r", at, "WORKER_CRASHED"))
    store.close()
    store = Store(tmp_path, retention=Retention(max_age_s=30 * 86400, max_rows=10, floor_s=600))
    path = tmp_path / STORE_FILE
    assert rows(path, "SELECT count(*) FROM crashes") == [(10,)]
    assert rows(path, "SELECT count(*) FROM failures") == [(10,)]
    assert rows(path, "SELECT min(at) FROM crashes")[0][0] > now - 15  # the newest were kept
    store.close()
    # The restart window is never pruned: with a floor of a day, 40-day-old rows go, the rest stay.
    store = Store(tmp_path, retention=Retention(max_age_s=1.0, max_rows=1000, floor_s=86400))
    assert rows(path, "SELECT count(*) FROM failures") == [(10,)]
    store.close()
