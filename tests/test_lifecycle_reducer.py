"""The lifecycle reducer, with plain data: total (every event in every state has an answer, and every
state it moves to is in the transition table), and what each decision is. That the runtime performs
what it returns is tests/test_lifecycle_inprocess*.py's."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from protocol import errors as E
from protocol.messages import Final, Init
from supervisor.config import RestartSettings
from supervisor.lifecycle import effects as X, events as V, states
from supervisor.lifecycle.reducer import reduce
from supervisor.lifecycle.states import ModelState as S
from supervisor.persistence.records import Failure, WorkerRecord
from supervisor.workers.classify import Verdict
from supervisor.workers.worker import Death

pytestmark = pytest.mark.timeout(30)

R = RestartSettings(quarantine_after=3, window_s=600.0, backoff_initial_s=1.0, backoff_max_s=60.0)
WORKER: Any = object()  # the reducer passes a worker through, never reads it
INIT = Init("m", "a", "/m", 1.0, 60.0, 0, 1, 512, 0.05)
CRASH = E.WorkerCrashed("worker pid 7 died (SIGKILL): killed", worker_pid=7)
DEATH = Death.of(Verdict(E.ErrorCode.WORKER_CRASHED, "killed"), 7)
ORPHAN = WorkerRecord(9, 1.0, "t", "a", "ipc://unused", 1)  # a previous run's worker, serving "a"


def facts(state: S, revision: str = "a", lkg: str | None = None, consecutive: int = 0,
          history: tuple[Failure, ...] = (), now: float = 100.0, **kw: Any) -> V.ModelFacts:
    return V.ModelFacts(state, revision, kw.pop("configured", "a"), lkg, consecutive, history, now, R, 30.0, 60.0,
                        kw.pop("group", False), kw.pop("force", False))


def fails(*spec: tuple[float, str]) -> tuple[Failure, ...]:
    return tuple(Failure(at, rev, "WORKER_CRASHED") for at, rev in spec)


FINAL = Final("canary", "ok", "stop", {"completion_tokens": 2})
EVIDENCE = {"text": "ok", "tokens": 2}
ONE_OF_EACH: list[V.Event] = [
    V.StartRequested("load"), V.StopRequested("unload"), V.Restored({"failures": 3, "message": "3 failures"}),
    V.ReleaseRequested(), V.RollbackRequested("old", "operator rollback to old"), V.AdmissionPassed(),
    V.AdmissionPassed(ORPHAN), V.Refused(E.SnapshotCorrupt("x")),
    V.Adopted(WORKER), V.AdoptionFailed("no hello"), V.Spawned(WORKER, INIT), V.HelloReceived(), V.Loaded(),
    V.CanaryPassed(FINAL, EVIDENCE), V.StartFailed(E.LoadTimeout("no ready"), WORKER), V.StartFailed(CRASH, WORKER, DEATH),
    V.WorkerExited(WORKER, DEATH, CRASH, None), V.Stopped("unload"), V.RestartDue(), V.Stable(True), V.Stable(False),
    V.Quarantined({"failures": 3, "message": "3 failures"}, "WORKER_CRASHED"),
]


def test_every_event_has_a_case() -> None:
    # ONE_OF_EACH must keep up with the Event union, or the totality test below misses a kind.
    assert {type(e) for e in ONE_OF_EACH} == set(V.Event.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("state", list(S))
def test_the_reducer_is_total_and_moves_only_along_the_table(state: S) -> None:
    for event in ONE_OF_EACH:
        t = reduce(facts(state), event)
        assert isinstance(t, X.Transition), (state, event)
        if t.state is not state:
            states.check(state, t.state)  # raises IllegalTransition: the runtime's to() would too
            assert t.reason, f"{state} -> {t.state} on {event} gives no reason"


@pytest.mark.parametrize("state", list(S))
def test_a_step_of_the_way_up_or_a_follow_up_never_comes_before_the_state_change(state: S) -> None:
    # Its event's own transition runs inside it: a state change after it would act on a stale state.
    chaining = (X.Adopt, X.Spawn, X.Greet, X.Load, X.RunCanary, X.FollowUp)
    for event in ONE_OF_EACH:
        t = reduce(facts(state), event)
        assert not any(isinstance(e, chaining) for e in t.first), (state, event)
        if any(isinstance(e, chaining) for e in t.effects) and not isinstance(event, V.RollbackRequested):
            assert isinstance(t.effects[-1], chaining), (state, event)


def _failure(t: X.Transition) -> dict[type, X.Effect]:
    return {type(e): e for e in (*t.first, *t.effects)}


def test_a_first_failure_records_itself_fails_its_requests_stops_its_worker_then_restarts_after_backoff() -> None:
    t = reduce(facts(S.READY, consecutive=1), V.WorkerExited(WORKER, DEATH, CRASH, "r1"))
    assert t.state is S.BACKOFF and t.reason == "WORKER_CRASHED"
    kinds = [type(e) for e in t.first]
    assert kinds == [X.RecordFailure, X.NoteFailure, X.FailRequests, X.StopWorker, X.RecordCrash, X.RetryHint]
    e = _failure(t)
    assert e[X.RecordFailure] == X.RecordFailure(Failure(100.0, "a", "WORKER_CRASHED", True))
    assert e[X.FailRequests] == X.FailRequests(CRASH) and e[X.NoteFailure] == X.NoteFailure(CRASH, "READY")
    assert e[X.RecordCrash] == X.RecordCrash(100.0, CRASH, "READY", WORKER, DEATH, "r1")
    (restart,) = t.effects
    assert isinstance(restart, X.ScheduleRestart) and 2.0 <= restart.delay_s <= 2.4  # 2nd in a row, +20% jitter
    assert dict(t.fields) == {"code": "WORKER_CRASHED", "retry_after_s": round(restart.delay_s, 3),
                              "failures_in_window": 1}


def test_the_same_facts_give_the_same_backoff_and_another_seed_another_jitter() -> None:
    event = V.WorkerExited(WORKER, DEATH, CRASH, None)
    delays = {seed: reduce(dataclasses.replace(facts(S.READY, consecutive=2), seed=seed), event).effects[0]
              for seed in (1, 1, 2)}
    assert len({reduce(facts(S.READY, consecutive=2), event).effects for _ in range(3)}) == 1  # pure
    assert delays[1] != delays[2]  # type: ignore[comparison-overlap]


def test_a_death_on_the_way_up_cancels_the_way_up_first_but_a_steps_own_error_does_not() -> None:
    for state in (S.STARTING, S.LOADING, S.CANARY):
        died = reduce(facts(state), V.WorkerExited(WORKER, DEATH, CRASH, None))
        assert died.state is S.BACKOFF and died.first[0] == X.CancelTask()
        failed = reduce(facts(state), V.StartFailed(E.LoadTimeout("no ready"), WORKER))
        assert failed.state is S.BACKOFF and X.CancelTask() not in failed.first  # it runs in the way up itself


def test_a_death_seen_through_the_canary_names_the_canary_as_the_request_served() -> None:
    t = reduce(facts(S.CANARY), V.StartFailed(CRASH, WORKER, DEATH))
    assert _failure(t)[X.RecordCrash].request_id == "canary"  # type: ignore[union-attr]
    t = reduce(facts(S.LOADING), V.StartFailed(CRASH, WORKER, DEATH))
    assert _failure(t)[X.RecordCrash].request_id is None  # type: ignore[union-attr]


def test_a_victim_is_recorded_uncounted_and_never_quarantines() -> None:
    victim = dataclasses.replace(DEATH, victim=True)
    t = reduce(facts(S.READY, history=fails((0, "a"), (10, "a")), now=20.0), V.WorkerExited(WORKER, victim, CRASH, None))
    assert t.state is S.BACKOFF and _failure(t)[X.RecordFailure] == X.RecordFailure(
        Failure(20.0, "a", "WORKER_CRASHED", False))
    assert isinstance(t.effects[0], X.ScheduleRestart) and dict(t.fields)["failures_in_window"] == 2


def test_the_failure_that_reaches_the_threshold_rolls_back_to_a_differing_lkg() -> None:
    f = facts(S.LOADING, "new", "old", 2, fails((0, "new"), (10, "new")), 20.0, configured="new")
    t = reduce(f, V.StartFailed(E.LoadFailed("boom"), WORKER))
    assert t.state is S.BACKOFF and t.effects == (X.FollowUp(V.RollbackRequested("old", "3 failures in window")),)
    # ...which, from BACKOFF, is the policy's: the old revision is admitted like any start.
    t = reduce(dataclasses.replace(f, state=S.BACKOFF), V.RollbackRequested("old", "3 failures in window"))
    assert t.state is S.ROLLING_BACK and t.first == (X.RunRevision("old"), X.Remember(None))
    assert t.effects == (X.BringUp(admit=True, force=False),)
    assert dict(t.fields) == {"target_revision": "old", "configured_revision": "new"}


def test_the_threshold_without_a_differing_lkg_quarantines_durably_first() -> None:
    for lkg in (None, "a"):
        t = reduce(facts(S.CANARY, "a", lkg, 2, fails((0, "a"), (10, "a")), 20.0),
                   V.StartFailed(E.CanaryFailed("boom"), WORKER))
        summary = {"failures": 3, "window_s": 600.0, "last_code": "CANARY_FAILED", "revision": "a",
                   "message": "3 failures in 600s, last CANARY_FAILED: boom"}
        assert t.state is S.BACKOFF and t.first[:2] == (X.RecordFailure(Failure(20.0, "a", "CANARY_FAILED")),
                                                        X.PersistQuarantine(summary))
        assert t.effects == (X.FollowUp(V.Quarantined(summary, "CANARY_FAILED")),)
        q = reduce(facts(S.BACKOFF), V.Quarantined(summary, "CANARY_FAILED"))
        assert q.state is S.QUARANTINED and q.reason == "too many failures" and "message" not in dict(q.fields)
        (quarantine,) = q.first
        assert isinstance(quarantine, X.Quarantine) and quarantine.error.code is E.ErrorCode.MODEL_QUARANTINED
        assert quarantine.error.message == summary["message"] and quarantine.error.details["failures"] == 3


def test_a_refusal_rejects_but_a_refused_rollback_quarantines() -> None:
    refused = E.SnapshotIncomplete("missing shard", file="model.safetensors")
    t = reduce(facts(S.ADMITTING), V.Refused(refused))
    assert (t.state, t.first, t.reason) == (S.REJECTED, (X.Reject(refused),), "SNAPSHOT_INCOMPLETE")
    assert dict(t.fields) == {"code": "SNAPSHOT_INCOMPLETE", "message": "missing shard", "file": "model.safetensors"}
    t = reduce(facts(S.ROLLING_BACK, "old", history=fails((0, "new"), (5, "new"), (8, "new")), now=10.0),
               V.Refused(refused))
    assert t.state is S.QUARANTINED and [type(e) for e in t.first] == [X.Reject, X.PersistQuarantine, X.Quarantine]
    summary = t.first[1].summary  # type: ignore[union-attr]
    assert summary["failures"] == 3 and summary["message"].endswith("last SNAPSHOT_INCOMPLETE: missing shard")


def test_a_stop_drains_only_a_serving_worker_then_stops_it() -> None:
    t = reduce(facts(S.READY), V.StopRequested("unload"))
    assert (t.state, t.first, t.reason) == (S.DRAINING, (X.CancelTask(),), "unload")
    drain, stop, fail, then = t.effects
    assert (drain, stop, then) == (X.Drain(30.0), X.StopWorker("unload"), X.FollowUp(V.Stopped("unload")))
    assert isinstance(fail, X.FailRequests) and fail.error.code is E.ErrorCode.SHUTTING_DOWN
    assert reduce(facts(S.DRAINING), V.Stopped("unload")) == X.Transition(S.UNLOADED, reason="unload")
    for starting in (S.STARTING, S.LOADING, S.CANARY):  # only the canary can be in flight
        stop_only = reduce(facts(starting), V.StopRequested("unload")).effects
        assert [type(e) for e in stop_only] == [X.StopWorker, X.FailRequests, X.FollowUp]


def test_a_stop_without_a_worker_state_leaves_at_once_and_the_due_restart_then_does_nothing() -> None:
    for waiting in (S.BACKOFF, S.ADMITTING, S.REJECTED, S.ROLLING_BACK, S.QUARANTINED):
        assert reduce(facts(waiting), V.StopRequested("x")) == X.Transition(
            S.UNLOADED, (X.CancelTask(), X.StopWorker("x")), reason="x")
    assert reduce(facts(S.BACKOFF, force=True), V.RestartDue()) == X.Transition(
        S.BACKOFF, (X.RetryHint(None), X.BringUp(admit=False, force=True)))
    assert reduce(facts(S.UNLOADED), V.RestartDue()) == X.Transition(S.UNLOADED)


def test_a_second_stop_only_cancels_the_models_task() -> None:
    for s in (S.UNLOADED, S.DRAINING):
        assert reduce(facts(s), V.StopRequested("x")) == X.Transition(s, (X.CancelTask(),))


def test_a_death_while_draining_fails_its_requests_and_forgets_its_record_but_is_no_failure() -> None:
    t = reduce(facts(S.DRAINING), V.WorkerExited(WORKER, DEATH, CRASH, None))
    assert t == X.Transition(S.DRAINING, (X.FailRequests(CRASH), X.ForgetWorker()))


def test_the_way_up_goes_one_state_per_step_and_names_the_next() -> None:
    assert reduce(facts(S.ADMITTING), V.AdmissionPassed()) == X.Transition(S.STARTING, (), (X.Spawn(),), "spawn")
    assert reduce(facts(S.STARTING), V.Spawned(WORKER, INIT)) == X.Transition(
        S.STARTING, (X.TakeWorker(WORKER),), (X.Greet(INIT),))
    assert reduce(facts(S.STARTING), V.HelloReceived()) == X.Transition(S.LOADING, (), (X.Load(),), "handshake done")
    assert reduce(facts(S.LOADING), V.Loaded()) == X.Transition(S.CANARY, (), (X.RunCanary(),), "weights loaded")
    t = reduce(facts(S.CANARY), V.CanaryPassed(FINAL, EVIDENCE))
    assert (t.state, t.reason, dict(t.fields)) == (S.READY, "canary passed", {"canary_tokens": 2})
    assert t.first == (X.KeepCanary(EVIDENCE), X.RetryHint(None))
    assert t.effects == (X.RecordWorker(), X.ArmStable(60.0))


def test_a_groups_way_up_says_every_rank_and_records_no_worker_to_adopt() -> None:
    assert reduce(facts(S.STARTING, group=True), V.HelloReceived()).reason == "handshake done with every rank"
    assert reduce(facts(S.LOADING, group=True), V.Loaded()).reason == "weights loaded on every rank"
    assert reduce(facts(S.CANARY, group=True), V.CanaryPassed(FINAL, EVIDENCE)).effects == (X.ArmStable(60.0),)


def test_an_orphan_of_the_running_revision_is_adopted_and_any_other_ended() -> None:
    assert reduce(facts(S.ADMITTING), V.AdmissionPassed(ORPHAN)) == X.Transition(
        S.STARTING, (), (X.Adopt(ORPHAN),), "adopting worker pid 9")
    stale = dataclasses.replace(ORPHAN, revision="z")
    assert reduce(facts(S.ADMITTING), V.AdmissionPassed(stale)) == X.Transition(
        S.STARTING, (), (X.EndOrphan(stale, "its revision z is no longer wanted"), X.Spawn()), "spawn")
    assert reduce(facts(S.STARTING), V.Adopted(WORKER)) == X.Transition(
        S.CANARY, (X.TakeWorker(WORKER),), (X.RunCanary(),), "adopted: weights already loaded")
    assert reduce(facts(S.STARTING), V.AdoptionFailed("no hello")) == X.Transition(
        S.STARTING, (X.ForgetWorker(),), (X.Spawn(),))


def test_a_step_whose_model_moved_on_changes_nothing() -> None:
    for event in (V.AdmissionPassed(), V.Spawned(WORKER, INIT), V.HelloReceived(), V.Loaded(), V.CanaryPassed(FINAL, EVIDENCE),
                  V.StartFailed(E.LoadTimeout("x"), WORKER), V.Refused(E.SnapshotCorrupt("x"))):
        for s in (S.UNLOADED, S.DRAINING, S.BACKOFF if not isinstance(event, V.AdmissionPassed) else S.READY):
            assert reduce(facts(s), event) == X.Transition(s), (s, event)


def test_stable_marks_lkg_only_for_the_current_ready_worker() -> None:
    assert reduce(facts(S.READY, "b"), V.Stable(current=True)) == X.Transition(S.READY, (X.MarkStable("b"),))
    assert reduce(facts(S.READY), V.Stable(current=False)) == X.Transition(S.READY)
    assert reduce(facts(S.BACKOFF), V.Stable(current=True)) == X.Transition(S.BACKOFF)


def test_a_start_begins_only_from_unloaded_or_rejected() -> None:
    for s in (S.UNLOADED, S.REJECTED):
        assert reduce(facts(s), V.StartRequested("load", True, force=True)) == X.Transition(
            S.ADMITTING, (X.Remember(True),), (X.BringUp(admit=True, force=True),), "load")
    for s in set(S) - {S.UNLOADED, S.REJECTED}:  # on its way up, serving, failing or quarantined
        assert reduce(facts(s), V.StartRequested("load")) == X.Transition(s)


def test_a_release_forgives_only_a_quarantined_or_rejected_model_and_doubts_every_file() -> None:
    for s in (S.QUARANTINED, S.REJECTED):
        assert reduce(facts(s, "old", configured="new"), V.ReleaseRequested()) == X.Transition(
            S.ADMITTING, (X.ForgetFailures(), X.RunRevision("new"), X.Remember(True)),
            (X.BringUp(admit=True, force=True, doubt=True),), "operator release")
    assert reduce(facts(S.READY), V.ReleaseRequested()) == X.Transition(
        S.READY, (X.RefuseOperation("is READY, not QUARANTINED or REJECTED"),))


def test_an_operators_rollback_stops_what_runs_then_starts_the_revision_forced() -> None:
    for s in (S.READY, S.QUARANTINED, S.UNLOADED):
        assert reduce(facts(s), V.RollbackRequested("old", "operator rollback to old")) == X.Transition(s, (), (
            X.FollowUp(V.StopRequested("operator rollback to old")), X.RunRevision("old"), X.Remember(None),
            X.LiftQuarantine(), X.FollowUp(V.StartRequested("operator rollback to old", wanted=True, force=True))))


def test_a_quarantine_restored_from_the_store_is_a_state_change_with_its_error() -> None:
    summary = {"failures": 3, "window_s": 600.0, "last_code": "WORKER_CRASHED", "revision": "a", "message": "3 fails"}
    t = reduce(facts(S.UNLOADED), V.Restored(summary))
    assert (t.state, t.reason) == (S.QUARANTINED, "restored from the store")
    assert dict(t.fields) == {k: v for k, v in summary.items() if k != "message"}
    (refuse,) = t.first
    assert isinstance(refuse, X.RefuseWith) and refuse.error.message == "3 fails"
