"""What an adoption hello must prove against the store's WorkerRecord (supervisor.workers.adoption):
the same pid, the same process start time, the recorded revision, and that revision still wanted.
"The same start time" allows the second that Linux's btime moves between two processes' readings
(protocol.messages.START_TIME_SLACK_S): an exact match refused a real worker now and then."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import psutil
import pytest

from protocol.messages import Hello
from supervisor.config import ModelConfig
from supervisor.persistence.records import WorkerRecord
from supervisor.workers import adoption
from supervisor.workers.process import AdoptionRefused, WorkerProcess

pytestmark = pytest.mark.timeout(10)

RECORD = adoption.worker_record(4242, 1700000000.5, "tok", "r1", "ipc://unused", 7)
PROOF = Hello("tok", 4242, "m", adopt=True, revision="r1", start_time=1700000000.5)


def test_worker_record_is_the_stores_typed_record() -> None:
    assert RECORD == WorkerRecord(4242, 1700000000.5, "tok", "r1", "ipc://unused", 7)


def test_the_recorded_worker_on_the_wanted_revision_is_proven() -> None:
    assert adoption.refusal(PROOF, RECORD, "r1") is None
    # The start time read by another process, across a flip of /proc/stat's btime: still this worker.
    btime_moved = dataclasses.replace(PROOF, start_time=RECORD.start_time + 1.0)
    assert adoption.refusal(btime_moved, RECORD, "r1") is None


@pytest.mark.parametrize(("change", "wanted", "why"), [
    ({"adopt": False}, "r1", "not an adoption hello"),
    ({"pid": 4243}, "r1", "pid 4243 is not the recorded 4242"),
    ({"start_time": None}, "r1", "process start time does not match the record"),
    ({"start_time": 1700000005.5}, "r1", "process start time does not match the record"),
    ({"revision": "r0"}, "r1", "it has revision r0, the record says r1"),
    ({}, "r2", "revision r1 is no longer wanted (want r2)"),
])
def test_each_mismatch_is_named(change: dict, wanted: str, why: str) -> None:
    assert adoption.refusal(dataclasses.replace(PROOF, **change), RECORD, wanted) == why


@pytest.mark.parametrize(("off_s", "taken"), [(0.0, True), (-1.0, True), (1.0, True), (5.0, False)])
def test_a_real_process_is_taken_over_by_its_start_time_give_or_take_btimes_second(off_s: float,
                                                                                    taken: bool) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    loop = asyncio.new_event_loop()
    exited = loop.create_future()
    try:
        recorded = psutil.Process(child.pid).create_time() + off_s
        proc = WorkerProcess(ModelConfig("m", "/models/m"), "ipc://unused", "tok", loop,
                             lambda _p, code: exited.set_result(code))
        if not taken:
            with pytest.raises(AdoptionRefused, match="reused"):
                proc.adopt(child.pid, recorded)
            assert not proc.adopted
            return
        proc.adopt(child.pid, recorded)
        assert proc.adopted and proc.pid == child.pid
        child.kill()  # and the adopted process's end is seen, as a worker's would be
        assert loop.run_until_complete(asyncio.wait_for(exited, 10)) is None
    finally:
        child.kill()
        child.wait()
        loop.close()
