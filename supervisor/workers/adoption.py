"""Adopting a worker left by a previous supervisor run: it must prove who it is (token as ZeroMQ
identity, pid, process start time, revision) before it serves again without reloading weights."""

from __future__ import annotations

import os

import psutil

from protocol.messages import START_TIME_SLACK_S, Adopt, Hello
from supervisor.persistence.records import WorkerRecord

def refusal(hello: Hello, record: WorkerRecord, wanted_revision: str) -> str | None:
    """Why this hello does not prove it is the recorded worker running the wanted revision."""
    if not hello.adopt:
        return "not an adoption hello"
    if hello.pid != record.pid:
        return f"pid {hello.pid} is not the recorded {record.pid}"
    if hello.start_time is None or abs(hello.start_time - record.start_time) > START_TIME_SLACK_S:
        return "process start time does not match the record"
    if hello.revision != record.revision:
        return f"it has revision {hello.revision}, the record says {record.revision}"
    if hello.revision != wanted_revision:
        return f"revision {hello.revision} is no longer wanted (want {wanted_revision})"
    return None


def adopt_message() -> Adopt:
    me = psutil.Process()
    return Adopt(os.getpid(), me.create_time())


def worker_record(pid: int, start_time: float, token: str, revision: str, socket: str, boot_id: int) -> WorkerRecord:
    """What the store keeps of a READY worker, for the next run to adopt it by."""
    return WorkerRecord(pid, start_time, token, revision, socket, boot_id)
