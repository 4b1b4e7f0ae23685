"""A model's lifecycle decisions as one pure function: (state, event, history, now, config) ->
(state, effects). No clocks, no IO: runtime.py performs the effects, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from protocol import errors as E
from supervisor.config import RestartSettings
from supervisor.lifecycle import policy
from supervisor.lifecycle.states import ModelState as S, WORKER_STATES

if TYPE_CHECKING:
    from supervisor.workers.classify import Verdict
    from supervisor.workers.handle import WorkerHandle

# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """A start or a READY worker failed: decided (and made durable) before its requests fail and its
    worker stops."""
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


@dataclass(frozen=True)
class StopRequested:
    """An operator's unload, an idle timeout, a reload or the supervisor's drain."""


@dataclass(frozen=True)
class RestartDue:
    """The backoff delay has passed."""


@dataclass(frozen=True)
class WorkerExited:
    """The model's own worker exited (one already replaced is no event)."""
    stopping: bool  # we asked it to stop: its exit is no failure


@dataclass(frozen=True)
class Stable:
    """READY for stable_after_s (as the timer set at READY sees it)."""
    current: bool


@dataclass(frozen=True)
class StartRequested:
    """An operator's load, autoload, a reload, a request for a model unloaded for idleness."""


@dataclass(frozen=True)
class ReleaseRequested:
    """An operator's release: leave QUARANTINED or REJECTED and try the configured revision again."""


@dataclass(frozen=True)
class RollbackRequested:
    """Run another known revision: from BACKOFF the policy's own rollback, else an operator's (which
    also lifts a quarantine)."""
    revision: str
    configured_revision: str  # for the record: what the config says, which it runs instead of


Event = Union[Failed, Refused, StopRequested, RestartDue, WorkerExited, Stable, StartRequested, ReleaseRequested,
              RollbackRequested]

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


@dataclass(frozen=True)
class Go:
    """A plain state change, for the reason the caller gave."""
    to: S
    fields: tuple[tuple[str, Any], ...] = ()  # extra fields of its model.state event


@dataclass(frozen=True)
class Begin:
    """Bring the model up (admission first, in ADMITTING and ROLLING_BACK) as the model's task."""


@dataclass(frozen=True)
class Forgive:
    """The operator fixed the cause: failures, quarantine and the last error go; the next admission
    reads every file again and a registry verdict of "failed" does not stop it."""


@dataclass(frozen=True)
class RunRevision:
    """Run this revision from now on (a rollback's)."""
    revision: str


@dataclass(frozen=True)
class StopFirst:
    """Stop the model (drain and all, as StopRequested), then go on with the next effects."""


@dataclass(frozen=True)
class StartForced:
    """Start again as the operator's word: wanted, its quarantine lifted, forced past the registry."""


@dataclass(frozen=True)
class RefuseOperation:
    """The operation makes no sense in this state: the operator gets BAD_REQUEST with this."""
    message: str


@dataclass(frozen=True)
class Drain:
    """Wait (bounded by drain_grace_s) for the requests in flight."""


@dataclass(frozen=True)
class StopWorker:
    pass


@dataclass(frozen=True)
class FailRequests:
    pass


@dataclass(frozen=True)
class BringUp:
    pass


@dataclass(frozen=True)
class WorkerDied:
    """Its requests fail with the cause, its record is forgotten."""


@dataclass(frozen=True)
class HandleFailure:
    """A READY worker died: the failure runs as the model's task (its start failures are already one)."""


@dataclass(frozen=True)
class MarkStable:
    """The backoff resets and the running revision becomes last-known-good."""


Effect = Union[RecordFailure, RecordCrash, EnterBackoff, ScheduleRestart, RollBack, Quarantine, Reject, Go,
               Drain, StopWorker, FailRequests, BringUp, WorkerDied, HandleFailure, MarkStable, Begin, Forgive,
               RunRevision, StopFirst, StartForced, RefuseOperation]

# States with no worker that a stop still has to leave (ADMITTING: an admission may be in flight).
_STOPPABLE = frozenset({S.BACKOFF, S.ADMITTING, S.REJECTED, S.ROLLING_BACK, S.QUARANTINED})


def reduce(state: S, event: Event, history: list[policy.Failure], now: float,
           restart: RestartSettings) -> tuple[S, list[Effect]]:
    """`history`: the model's failures in the window, not yet including this event's (only
    Failed and Refused read it, and `now`)."""
    if isinstance(event, Failed):
        return _failed(event, history, now, restart)
    if isinstance(event, Refused):
        return _refused(state, event, history, now, restart)
    if isinstance(event, StopRequested):
        return _stop(state)
    if isinstance(event, RestartDue):  # a stop during the backoff has moved the model on
        return (state, [BringUp()]) if state is S.BACKOFF else (state, [])
    if isinstance(event, Stable):
        return state, [MarkStable()] if event.current and state is S.READY else []
    if isinstance(event, WorkerExited):
        return _exited(state, event)
    return _operator(state, event)


def _operator(state: S, event: Event) -> tuple[S, list[Effect]]:
    """Start, release and rollback: what an operator (or the daemon on its behalf) asks for."""
    if isinstance(event, StartRequested):  # anywhere else it is on its way up, or there, already
        return (S.ADMITTING, [Go(S.ADMITTING), Begin()]) if state in (S.UNLOADED, S.REJECTED) else (state, [])
    if isinstance(event, ReleaseRequested):
        if state not in (S.QUARANTINED, S.REJECTED):
            return state, [RefuseOperation(f"is {state.value}, not QUARANTINED or REJECTED")]
        return S.ADMITTING, [Forgive(), Go(S.ADMITTING), Begin()]
    assert isinstance(event, RollbackRequested)
    if state is S.BACKOFF:  # the policy's rollback: the new revision is admitted like any start
        fields = (("target_revision", event.revision), ("configured_revision", event.configured_revision))
        return S.ROLLING_BACK, [RunRevision(event.revision), Go(S.ROLLING_BACK, fields), Begin()]
    return S.ADMITTING, [StopFirst(), RunRevision(event.revision), StartForced()]


def _stop(state: S) -> tuple[S, list[Effect]]:
    if state in WORKER_STATES and state is not S.DRAINING:
        # Before READY only the canary can be in flight: nobody to wait for.
        drain: list[Effect] = [Drain()] if state is S.READY else []
        return S.UNLOADED, [Go(S.DRAINING), *drain, StopWorker(), FailRequests(), Go(S.UNLOADED)]
    if state in _STOPPABLE:
        return S.UNLOADED, [StopWorker(), Go(S.UNLOADED)]
    return state, []  # UNLOADED already, or DRAINING: another stop is under way


def _exited(state: S, ev: WorkerExited) -> tuple[S, list[Effect]]:
    if ev.stopping:  # a failure while stopping is the stop's own doing
        return state, []
    # A death during start surfaces as the error of what the start awaits; only READY needs a task.
    return state, [WorkerDied(), *([HandleFailure()] if state is S.READY else [])]


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
                 worker: "WorkerHandle | None", phase: str, request_id: str | None) -> dict[str, Any]:
    """What RecordCrash keeps: the failure, its cause, the request the worker was serving, and what
    the worker last showed."""
    return {
        "model": model, "revision": revision, "at": now, "code": exc.code.code,
        "cause": verdict.cause if verdict else exc.message, "victim": bool(verdict and verdict.victim),
        "signal": exc.details.get("signal"), "exit_code": exc.details.get("exit_code"), "phase": phase,
        "request_id": request_id,
        "worker_pid": worker.process.pid if worker else None,
        "memory": worker.memory if worker else {},
        "stderr_tail": list(worker.process.stderr_tail) if worker else [],
        # A group's failure names the rank and the host it ran on (supervisor.workers.group).
        **{k: exc.details[k] for k in ("rank", "host") if k in exc.details},
    }
