"""The store's typed records (persistence/records.py): model flags, crash records and live-worker
records go in and come back as frozen dataclasses, across a reopen too; history's dict shape (the wire's)
stays exactly as it was; and a caller cannot change what the store holds."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from supervisor.config import ModelConfig
from supervisor.persistence.records import CrashRecord, ModelFlags, WorkerRecord
from supervisor.persistence.store import Store, STORE_FILE

pytestmark = pytest.mark.timeout(60)

NOW = time.time()  # history older than the retention (30 days) is pruned when a store opens
CRASH = CrashRecord("m", "r1", NOW - 2, "WORKER_CRASHED", cause="killed by SIGKILL", signal="SIGKILL",
                    exit_code=None, phase="READY", request_id="req-1", worker_pid=4242,
                    memory={"rss_bytes": 123}, stderr_tail=("line one", "line two"))
GROUP_CRASH = dataclasses.replace(CRASH, at=NOW - 1, code="PEER_UNAVAILABLE", rank=1, host="peer-a", victim=True)
HISTORY_KEYS = ["id", "model", "revision", "at", "code", "cause", "victim", "signal", "exit_code", "phase",
                "request_id", "worker_pid", "memory", "stderr_tail", "rank", "host"]


def test_flags_of_an_unseen_model_are_the_defaults_and_follow_every_write_across_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.flags("m") == ModelFlags()
    good = ModelConfig("m", "/models/m")
    store.set_lkg(good)
    store.set_wanted("m", False, "run-rev", "cfg-rev")
    store.set_quarantine("m", {"message": "3 failures", "failures": 3})
    expected = ModelFlags(True, {"message": "3 failures", "failures": 3}, good.revision, "run-rev", "cfg-rev", False)
    assert store.flags("m") == expected
    store.close()
    reopened = Store(tmp_path)
    assert reopened.flags("m") == expected
    reopened.set_quarantine("m", None)
    assert reopened.flags("m").quarantined is False and reopened.flags("m").quarantine is None
    reopened.close()


def test_a_caller_that_changes_the_quarantine_summary_it_got_changes_nothing_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_quarantine("m", {"message": "quarantined"})
    store.flags("m").quarantine["message"] = "changed by a caller"
    assert store.flags("m").quarantine == {"message": "quarantined"}
    store.close()


def test_crash_records_come_back_typed_and_history_keeps_its_shape(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_crash(CRASH)
    store.add_crash(GROUP_CRASH)
    store.close()
    reopened = Store(tmp_path)
    newest, oldest = reopened.crash_records("m")
    assert isinstance(newest.id, int) and isinstance(oldest.id, int) and newest.id > oldest.id
    assert dataclasses.replace(newest, id=None) == GROUP_CRASH
    assert dataclasses.replace(oldest, id=None) == CRASH
    history = reopened.crashes("m")
    assert [list(h) for h in history] == [HISTORY_KEYS, HISTORY_KEYS]
    assert history[1] == {**{k: None for k in HISTORY_KEYS}, "id": oldest.id, "model": "m", "revision": "r1",
                          "at": NOW - 2, "code": "WORKER_CRASHED", "cause": "killed by SIGKILL", "victim": False,
                          "signal": "SIGKILL", "phase": "READY", "request_id": "req-1", "worker_pid": 4242,
                          "memory": {"rss_bytes": 123}, "stderr_tail": ["line one", "line two"]}
    assert reopened.crash_records("m", limit=1) == [newest]
    assert reopened.crash_records("other") == []
    reopened.close()


def test_the_failed_event_names_a_rank_and_host_only_for_a_groups_failure() -> None:
    single, group = CRASH.event_fields(), GROUP_CRASH.event_fields()
    assert "rank" not in single and "host" not in single and "at" not in single and "id" not in single
    assert group["rank"] == 1 and group["host"] == "peer-a" and group["victim"] is True
    assert list(single) == [k for k in HISTORY_KEYS if k not in ("id", "at", "rank", "host")]


def test_a_live_worker_record_round_trips_and_is_removed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.worker_record("m") is None
    record = WorkerRecord(4242, 1700000000.5, "tok", "rev", "ipc:///state/workers.sock", 7)
    store.set_worker("m", record)
    store.close()
    reopened = Store(tmp_path)
    assert reopened.worker_record("m") == record
    reopened.set_worker("m", None)
    reopened.close()
    db = sqlite3.connect(tmp_path / STORE_FILE)
    try:
        assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)
    finally:
        db.close()
