"""Every decision about a model's lifecycle, as one pure function: reduce(facts, event) -> Transition.
Total: each event in each state has an answer (most often "nothing changes"). No clocks, no IO, no
randomness (the backoff's jitter is seeded from the facts): runtime.py applies the state through its
one to() and performs every effect; startup.py performs the way up and returns its events."""

from __future__ import annotations

import random
from typing import Any, assert_never

from protocol import errors as E
from supervisor.lifecycle import policy
from supervisor.lifecycle.effects import (
    Adopt, ArmStable, BringUp, CancelTask, Drain, Effect, FailRequests, FollowUp, ForgetFailures, ForgetWorker,
    Greet, KeepCanary, LiftQuarantine, Load, MarkStable, NoteFailure, PersistQuarantine, Quarantine, RecordCrash,
    RecordFailure, RecordWorker, RefuseOperation, RefuseWith, Reject, Remember, RetryHint, RunCanary, RunRevision,
    ScheduleRestart, Spawn, StopWorker, TakeWorker, Transition, EndOrphan)
from supervisor.lifecycle.events import (
    AdmissionPassed, Adopted, AdoptionFailed, CanaryPassed, Event, HelloReceived, Loaded, ModelFacts, Quarantined,
    Refused, ReleaseRequested, RestartDue, Restored, RollbackRequested, Spawned, Stable, StartFailed, StartRequested,
    Stopped, StopRequested, WorkerExited)
from supervisor.lifecycle.states import ModelState as S
from supervisor.persistence.records import Failure

# On the way up: the model's task is bringing it up, and its worker's death is a failure of the start.
_STARTING = frozenset({S.STARTING, S.LOADING, S.CANARY})
# States with no worker that a stop still has to leave (ADMITTING: an admission may be in flight).
_STOPPABLE = frozenset({S.BACKOFF, S.ADMITTING, S.REJECTED, S.ROLLING_BACK, S.QUARANTINED})
# Where an admission's (or a restart's) answer is awaited.
_ADMITTING = frozenset({S.ADMITTING, S.ROLLING_BACK, S.BACKOFF})


def reduce(f: ModelFacts, event: Event) -> Transition:
    """What `event` means for a model whose facts are `f`."""
    match event:
        case StartRequested() | ReleaseRequested() | RollbackRequested() | Restored():
            return _operator(f, event)
        case StopRequested(reason):
            return _stop(f, reason)
        case Stopped(reason):
            return Transition(S.UNLOADED, reason=reason) if f.state is S.DRAINING else _same(f)
        case AdmissionPassed() | Refused() | Adopted() | AdoptionFailed() | Spawned() | HelloReceived() | Loaded() \
                | CanaryPassed():
            return _way_up(f, event)
        case StartFailed(error, worker, death):
            if f.state not in _STARTING:  # a stop, or the worker's death, has moved the model on already
                return _same(f)
            request_id = "canary" if death is not None and f.state is S.CANARY else None
            return _failure(f, error, worker, death, request_id, cancel=False)
        case WorkerExited(worker, death, error, request_id):
            if f.state in _STARTING or f.state is S.READY:
                return _failure(f, error, worker, death, request_id, cancel=f.state in _STARTING)
            return Transition(f.state, (FailRequests(error), ForgetWorker()))  # draining: no failure of its own
        case RestartDue():  # a stop during the backoff has moved the model on
            if f.state is not S.BACKOFF:
                return _same(f)
            return Transition(S.BACKOFF, (RetryHint(None), BringUp(admit=False, force=f.force)))
        case Stable(current):
            return Transition(S.READY, (MarkStable(f.revision),)) if current and f.state is S.READY else _same(f)
        case Quarantined(summary, code):
            if f.state is not S.BACKOFF:
                return _same(f)
            return Transition(S.QUARANTINED, (Quarantine(quarantine_error(summary), code),),
                              reason="too many failures", fields=_details(summary))
        case _:
            assert_never(event)


def _same(f: ModelFacts) -> Transition:
    return Transition(f.state)


def _operator(f: ModelFacts, event: StartRequested | ReleaseRequested | RollbackRequested | Restored) -> Transition:
    """Start, release, rollback and a restored quarantine: an operator's word (or the store's)."""
    match event:
        case StartRequested(reason, wanted, force):  # anywhere else it is on its way up, or there, already
            if f.state not in (S.UNLOADED, S.REJECTED):
                return _same(f)
            return Transition(S.ADMITTING, (Remember(wanted),), (BringUp(admit=True, force=force),), reason)
        case ReleaseRequested():
            if f.state not in (S.QUARANTINED, S.REJECTED):
                return Transition(f.state, (RefuseOperation(f"is {f.state.value}, not QUARANTINED or REJECTED"),))
            # Whatever it was, every file is read again and a registry verdict of "failed" does not stop it.
            return Transition(S.ADMITTING, (ForgetFailures(), RunRevision(f.configured_revision), Remember(True)),
                              (BringUp(admit=True, force=True, doubt=True),), "operator release")
        case RollbackRequested(revision, reason):
            if f.state is S.BACKOFF:  # the policy's rollback: the new revision is admitted like any start
                return Transition(S.ROLLING_BACK, (RunRevision(revision), Remember(None)),
                                  (BringUp(admit=True, force=f.force),),
                                  reason, (("target_revision", revision),
                                           ("configured_revision", f.configured_revision)))
            # An operator's: stop what runs, then start on the revision, its quarantine lifted, forced.
            return Transition(f.state, (), (FollowUp(StopRequested(reason)), RunRevision(revision), Remember(None),
                                            LiftQuarantine(),
                                            FollowUp(StartRequested(reason, wanted=True, force=True))))
        case Restored(summary):
            if f.state is not S.UNLOADED:
                return _same(f)
            return Transition(S.QUARANTINED, (RefuseWith(quarantine_error(summary)),),
                              reason="restored from the store", fields=_details(summary))
        case _:
            assert_never(event)


def _stop(f: ModelFacts, reason: str) -> Transition:
    if f.state in _STARTING or f.state is S.READY:
        # Before READY only the canary can be in flight: nobody to wait for.
        drain: tuple[Effect, ...] = (Drain(f.drain_grace_s),) if f.state is S.READY else ()
        return Transition(S.DRAINING, (CancelTask(),),
                          (*drain, StopWorker(reason), FailRequests(E.ShuttingDown(f"model stopped: {reason}")),
                           FollowUp(Stopped(reason))), reason)
    if f.state in _STOPPABLE:
        return Transition(S.UNLOADED, (CancelTask(), StopWorker(reason)), reason=reason)
    return Transition(f.state, (CancelTask(),))  # UNLOADED already, or DRAINING: another stop is under way


def _way_up(f: ModelFacts, event: AdmissionPassed | Refused | Adopted | AdoptionFailed | Spawned | HelloReceived
            | Loaded | CanaryPassed) -> Transition:
    """Each step's answer moves the model one state on and names the next step; a step whose model
    has moved on meanwhile (a stop) changes nothing."""
    match event:
        case AdmissionPassed(orphan) if f.state in _ADMITTING:
            if orphan is not None and orphan.revision == f.revision:  # still ours, serving what runs
                return Transition(S.STARTING, (), (Adopt(orphan),), f"adopting worker pid {orphan.pid}")
            ending = (EndOrphan(orphan, f"its revision {orphan.revision} is no longer wanted"),) if orphan else ()
            return Transition(S.STARTING, (), (*ending, Spawn()), "spawn")
        case Refused(error) if f.state in (S.ADMITTING, S.ROLLING_BACK):
            return _refused(f, error)
        case Adopted(worker) if f.state is S.STARTING:
            return Transition(S.CANARY, (TakeWorker(worker),), (RunCanary(),), "adopted: weights already loaded")
        case AdoptionFailed() if f.state is S.STARTING:  # the supervisor went away, not the model: no failure
            return Transition(S.STARTING, (ForgetWorker(),), (Spawn(),))
        case Spawned(worker, init) if f.state is S.STARTING:
            return Transition(S.STARTING, (TakeWorker(worker),), (Greet(init),))
        case HelloReceived() if f.state is S.STARTING:
            return Transition(S.LOADING, (), (Load(),),
                              "handshake done with every rank" if f.group else "handshake done")
        case Loaded() if f.state is S.LOADING:
            return Transition(S.CANARY, (), (RunCanary(),), "weights loaded on every rank" if f.group else "weights loaded")
        case CanaryPassed(result, evidence) if f.state is S.CANARY:
            # A group's ranks end with their supervisor: nothing to adopt.
            serving: tuple[Effect, ...] = () if f.group else (RecordWorker(),)
            return Transition(S.READY, (KeepCanary(evidence), RetryHint(None)), (*serving, ArmStable(f.stable_after_s)),
                              "canary passed", (("canary_tokens", result.usage.get("completion_tokens")),))
    return _same(f)


def _refused(f: ModelFacts, error: E.LmxError) -> Transition:
    code = error.code.code
    if f.state is S.ROLLING_BACK:  # rolling back did not help either: an operator decides
        count = policy.failures_in_window(list(f.history), f.now, f.restart.window_s)
        summary = _summary(count, f, code, error.message)
        return Transition(S.QUARANTINED, (Reject(error), PersistQuarantine(summary),
                                          Quarantine(quarantine_error(summary), code)),
                          reason="too many failures", fields=_details(summary))
    return Transition(S.REJECTED, (Reject(error),), reason=code,
                      fields=(("code", code), ("message", error.message), ("file", error.details.get("file"))))


def _failure(f: ModelFacts, error: E.LmxError, worker: Any, death: Any, request_id: str | None,
             cancel: bool) -> Transition:
    """A start or a READY worker failed. The policy's verdict (restart after a backoff, roll back, or
    quarantine) and its safety records are written first; then its requests fail and what is left of
    the worker stops; then BACKOFF (every failure passes through it: its code and retry hint are one
    state change), from where the verdict moves it on."""
    code = error.code.code
    failure = Failure(f.now, f.revision, code, not (death is not None and death.victim))
    decision = policy.decide([*f.history, failure], f.now, f.restart, f.revision, f.lkg_revision,
                             f.consecutive_failures + 1, random.Random(f.seed))
    count = decision.failures_in_window
    records: tuple[Effect, ...] = (RecordFailure(failure),)
    verdict: Effect
    if decision.action is policy.Action.QUARANTINE:
        summary = _summary(count, f, code, error.message)
        records += (PersistQuarantine(summary),)
        verdict = FollowUp(Quarantined(summary, code))
    elif decision.action is policy.Action.ROLLBACK:
        assert decision.revision is not None
        verdict = FollowUp(RollbackRequested(decision.revision, f"{count} failures in window"))
    else:
        verdict = ScheduleRestart(decision.delay_s)
    first = (*((CancelTask(),) if cancel else ()), *records, NoteFailure(error, f.state.value),
             FailRequests(error), StopWorker(f"failed: {code}"),
             RecordCrash(f.now, error, f.state.value, worker, death, request_id), RetryHint(decision.delay_s))
    return Transition(S.BACKOFF, first, (verdict,), code,
                      (("code", code), ("retry_after_s", round(decision.delay_s, 3)), ("failures_in_window", count)))


def _summary(failures: int, f: ModelFacts, code: str, message: str) -> dict[str, Any]:
    window_s = f.restart.window_s
    return {
        "failures": failures, "window_s": window_s, "last_code": code, "revision": f.revision,
        "message": f"{failures} failures in {window_s:.0f}s, last {code}: {message}",
    }


def _details(summary: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in summary.items() if k != "message")


def quarantine_error(summary: dict[str, Any]) -> E.LmxError:
    """What every request gets while the model is quarantined: the summary the store keeps."""
    details = {k: v for k, v in summary.items() if k != "message"}
    return E.ModelQuarantined(summary.get("message", "quarantined"), **details)
