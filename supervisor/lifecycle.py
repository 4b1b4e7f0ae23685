"""A model's lifecycle decisions as one pure function: (state, event, history, now, config) ->
(state, effects). No clocks, no IO: runtime.py performs the effects, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from protocol import errors as E
from supervisor import policy
from supervisor.config import RestartSettings
from supervisor.states import ModelState as S

if TYPE_CHECKING:
    from supervisor.classify import Verdict
    from supervisor.handle import Worker

# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """A start or a READY worker failed; its requests are failed and its worker stopped by now."""
    code: str
    message: str
    revision: str  # the revision that was running
    lkg_revision: str | None
    consecutive_failures: int  # this one included
    victim: bool = False  # killed for another's sake: restarts, but is not held against the model


@dataclass(frozen=True)
class Refused:
    """Admission refused the revision to run (the registry, integrity, or memory said no)."""
    code: str
    message: str
    revision: str


Event = Union[Failed, Refused]

# --- effects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordFailure:
    failure: policy.Failure


@dataclass(frozen=True)
class RecordCrash:
    """The crash record (its fields are the worker's, which only the runtime has)."""
    at: float


@dataclass(frozen=True)
class EnterBackoff:
    delay_s: float
    failures_in_window: int


@dataclass(frozen=True)
class ScheduleRestart:
    delay_s: float


@dataclass(frozen=True)
class RollBack:
    revision: str
    reason: str


@dataclass(frozen=True)
class Quarantine:
    summary: dict  # failures, window_s, last_code, revision, message: what the store keeps


@dataclass(frozen=True)
class Reject:
    code: str


Effect = Union[RecordFailure, RecordCrash, EnterBackoff, ScheduleRestart, RollBack, Quarantine, Reject]


def reduce(state: S, event: Event, history: list[policy.Failure], now: float,
           restart: RestartSettings) -> tuple[S, list[Effect]]:
    """`history`: the model's failures in the window, not yet including this event's."""
    if isinstance(event, Failed):
        return _failed(event, history, now, restart)
    return _refused(state, event, history, now, restart)


def _failed(ev: Failed, history: list[policy.Failure], now: float,
            restart: RestartSettings) -> tuple[S, list[Effect]]:
    failure = policy.Failure(now, ev.revision, ev.code, not ev.victim)
    decision = policy.decide([*history, failure], now, restart, ev.revision, ev.lkg_revision,
                             ev.consecutive_failures)
    count = decision.failures_in_window
    # Every failure passes through BACKOFF, so its code and retry hint are one state change.
    effects: list[Effect] = [RecordFailure(failure), RecordCrash(now), EnterBackoff(decision.delay_s, count)]
    if decision.action is policy.Action.QUARANTINE:
        return S.QUARANTINED, [*effects, Quarantine(_summary(count, restart, ev.code, ev.message, ev.revision))]
    if decision.action is policy.Action.ROLLBACK:
        assert decision.revision is not None
        return S.ROLLING_BACK, [*effects, RollBack(decision.revision, f"{count} failures in window")]
    return S.BACKOFF, [*effects, ScheduleRestart(decision.delay_s)]


def _refused(state: S, ev: Refused, history: list[policy.Failure], now: float,
             restart: RestartSettings) -> tuple[S, list[Effect]]:
    if state is S.ROLLING_BACK:  # rolling back did not help either: an operator decides
        count = policy.failures_in_window(history, now, restart.window_s)
        return S.QUARANTINED, [Quarantine(_summary(count, restart, ev.code, ev.message, ev.revision))]
    return S.REJECTED, [Reject(ev.code)]


def _summary(failures: int, restart: RestartSettings, code: str, message: str, revision: str) -> dict:
    return {
        "failures": failures, "window_s": restart.window_s, "last_code": code, "revision": revision,
        "message": f"{failures} failures in {restart.window_s:.0f}s, last {code}: {message}",
    }


def crash_record(model: str, revision: str, now: float, exc: E.LmxError, verdict: "Verdict | None",
                 worker: "Worker | None", phase: str) -> dict[str, Any]:
    """What RecordCrash keeps: the failure, its cause, and what the worker last showed."""
    return {
        "model": model, "revision": revision, "at": now, "code": exc.code.code,
        "cause": verdict.cause if verdict else exc.message, "victim": bool(verdict and verdict.victim),
        "signal": exc.details.get("signal"), "exit_code": exc.details.get("exit_code"), "phase": phase,
        "request_id": worker.death_request if worker else None,
        "worker_pid": worker.process.pid if worker else None,
        "memory": worker.memory if worker else {},
        "stderr_tail": list(worker.process.stderr_tail) if worker else [],
    }
