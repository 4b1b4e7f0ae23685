"""A model's crash record, as the store, metrics, the model.failed event and the registry get it:
built from the RecordCrash effect (the failure, its cause, the request the worker was serving, and
what the worker last showed). A failure's order (its safety records durable before it is observable,
docs/security.md) is the reducer's: lifecycle/reducer.py `_failure`."""

from __future__ import annotations

from supervisor.lifecycle.effects import RecordCrash
from supervisor.persistence.records import CrashRecord


def crash_record(model: str, revision: str, e: RecordCrash) -> CrashRecord:
    exc, death, worker = e.error, e.death, e.worker
    return CrashRecord(
        model, revision, e.at, exc.code.code, cause=death.cause if death else exc.message,
        victim=bool(death and death.victim), signal=exc.details.get("signal"), exit_code=exc.details.get("exit_code"),
        phase=e.phase, request_id=e.request_id if death is not None else None,
        worker_pid=worker.process.pid if worker else None, memory=dict(worker.memory) if worker else {},
        stderr_tail=tuple(worker.process.stderr_tail) if worker else (),
        # A group's failure names the rank and the host it ran on (supervisor.workers.group).
        rank=exc.details.get("rank"), host=exc.details.get("host"))
