"""What an adoption hello must prove against the store's WorkerRecord (supervisor.workers.adoption):
the same pid, the same process start time, the recorded revision, and that revision still wanted."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.messages import Hello
from supervisor.persistence.records import WorkerRecord
from supervisor.workers import adoption

pytestmark = pytest.mark.timeout(10)

RECORD = adoption.worker_record(4242, 1700000000.5, "tok", "r1", "ipc://unused", 7)
PROOF = Hello("tok", 4242, "m", adopt=True, revision="r1", start_time=1700000000.5)


def test_worker_record_is_the_stores_typed_record() -> None:
    assert RECORD == WorkerRecord(4242, 1700000000.5, "tok", "r1", "ipc://unused", 7)


def test_the_recorded_worker_on_the_wanted_revision_is_proven() -> None:
    assert adoption.refusal(PROOF, RECORD, "r1") is None
    within_a_tick = dataclasses.replace(PROOF, start_time=RECORD.start_time + adoption.START_TIME_SLACK_S / 2)
    assert adoption.refusal(within_a_tick, RECORD, "r1") is None


@pytest.mark.parametrize(("change", "wanted", "why"), [
    ({"adopt": False}, "r1", "not an adoption hello"),
    ({"pid": 4243}, "r1", "pid 4243 is not the recorded 4242"),
    ({"start_time": None}, "r1", "process start time does not match the record"),
    ({"start_time": 1700000001.5}, "r1", "process start time does not match the record"),
    ({"revision": "r0"}, "r1", "it has revision r0, the record says r1"),
    ({}, "r2", "revision r1 is no longer wanted (want r2)"),
])
def test_each_mismatch_is_named(change: dict, wanted: str, why: str) -> None:
    assert adoption.refusal(dataclasses.replace(PROOF, **change), RECORD, wanted) == why
