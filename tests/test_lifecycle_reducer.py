"""A model's lifecycle: restored states go through the table, and waits wake on notifications."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from protocol.messages import GenerateRequest
from supervisor import config as cfg_mod
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.lifecycle.states import ModelState as S
from supervisor.persistence.store import Store
from supervisor.services import Services


def _runtime(tmp_path: Path) -> ModelRuntime:
    (tmp_path / "m").mkdir(exist_ok=True)
    config = cfg_mod.parse(f'[[models]]\nid = "m"\npath = "{tmp_path / "m"}"\n')
    return ModelRuntime(config.models[0], Services(config, Store(tmp_path), None, "ipc://unused"))


def _quarantine(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    rt._remember(True)
    rt.store.set_quarantine("m", {"failures": 3, "window_s": 600.0, "last_code": "WORKER_CRASHED",
                                  "revision": rt.cfg.revision, "message": "3 failures"})
    rt.store.close()


def test_a_restored_quarantine_is_a_model_state_change(tmp_path: Path) -> None:
    _quarantine(tmp_path)
    with capture_logs() as logged:
        rt = _runtime(tmp_path)
    assert rt.state is S.QUARANTINED
    changes = [e for e in logged if e["event"] == "model.state"]
    assert [(e["from"], e["to"], e["reason"]) for e in changes] == [
        ("UNLOADED", "QUARANTINED", "restored from the store")]
    assert changes[0]["failures"] == 3 and rt.last_error is not None


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_until_wakes_on_the_state_change_that_makes_it_hold(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)

    async def scenario() -> tuple[bool, bool]:
        waiter = asyncio.ensure_future(rt.until(lambda: rt.state is S.REJECTED))
        rt.to(S.ADMITTING, "test")
        await _turns(3)
        early = waiter.done()  # woken by a change, but the condition does not hold yet
        rt.to(S.REJECTED, "test")
        await _turns(3)
        return early, waiter.done()

    assert asyncio.run(scenario()) == (False, True)


def test_until_returns_at_once_when_it_already_holds(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    asyncio.run(rt.until(lambda: rt.state is S.UNLOADED))


def test_drain_ends_when_the_last_request_ends(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)

    async def scenario() -> tuple[bool, bool]:
        # No worker: the request stays queued until its client cancels it.
        wrid = rt.requests.add(GenerateRequest(request_id="r", model="m", prompt="hi"), lambda _: None)
        drain = asyncio.ensure_future(rt._drain(600))
        await _turns(3)
        waiting = not drain.done()
        rt.cancel(wrid)
        await _turns(3)
        return waiting, drain.done()

    assert asyncio.run(scenario()) == (True, True)


# --- the reducer, with plain data ---------------------------------------------------------------

from supervisor.lifecycle import reducer as L  # noqa: E402
from supervisor.config import RestartSettings  # noqa: E402
from supervisor.lifecycle.policy import Failure  # noqa: E402

R = RestartSettings(quarantine_after=3, window_s=600.0, backoff_initial_s=1.0, backoff_max_s=60.0)


def _failed(revision: str = "a", lkg: str | None = None, consecutive: int = 1, victim: bool = False) -> L.Failed:
    return L.Failed("WORKER_CRASHED", "boom", revision, lkg, consecutive, victim)


def _history(*spec: tuple[float, str]) -> list[Failure]:
    return [Failure(at, rev, "WORKER_CRASHED") for at, rev in spec]


def test_a_first_failure_records_itself_then_restarts_with_backoff() -> None:
    state, effects = L.reduce(S.READY, _failed(consecutive=2), [], 100.0, R)
    assert state is S.BACKOFF
    record, crash, backoff, restart = effects
    assert record == L.RecordFailure(Failure(100.0, "a", "WORKER_CRASHED", True)) and crash == L.RecordCrash(100.0)
    assert isinstance(restart, L.ScheduleRestart) and 2.0 <= restart.delay_s <= 2.4
    assert backoff == L.EnterBackoff(restart.delay_s, 1)


def test_a_victim_is_recorded_uncounted_and_never_quarantines() -> None:
    state, effects = L.reduce(S.READY, _failed(victim=True), _history((0, "a"), (10, "a")), 20.0, R)
    assert state is S.BACKOFF and effects[0] == L.RecordFailure(Failure(20.0, "a", "WORKER_CRASHED", False))
    assert effects[2] == L.EnterBackoff(effects[3].delay_s, 2)  # type: ignore[union-attr]


def test_the_failure_that_reaches_the_threshold_rolls_back_to_a_differing_lkg() -> None:
    state, effects = L.reduce(S.LOADING, _failed("new", "old", 3), _history((0, "new"), (10, "new")), 20.0, R)
    assert state is S.ROLLING_BACK
    assert effects[2:] == [L.EnterBackoff(0.0, 3), L.RollBack("old", "3 failures in window")]


def test_the_threshold_without_a_differing_lkg_quarantines_with_its_summary() -> None:
    for lkg in (None, "a"):
        state, effects = L.reduce(S.CANARY, _failed("a", lkg, 3), _history((0, "a"), (10, "a")), 20.0, R)
        assert state is S.QUARANTINED
        assert effects[2] == L.EnterBackoff(0.0, 3)
        assert effects[3] == L.Quarantine({"failures": 3, "window_s": 600.0, "last_code": "WORKER_CRASHED",
                                           "revision": "a", "message": "3 failures in 600s, last WORKER_CRASHED: boom"})


def test_a_refusal_rejects_but_a_refused_rollback_quarantines() -> None:
    refused = L.Refused("SNAPSHOT_INCOMPLETE", "missing shard", "old")
    assert L.reduce(S.ADMITTING, refused, _history((0, "new")), 10.0, R) == (
        S.REJECTED, [L.Reject("SNAPSHOT_INCOMPLETE")])
    state, effects = L.reduce(S.ROLLING_BACK, refused, _history((0, "new"), (5, "new"), (8, "new")), 10.0, R)
    assert state is S.QUARANTINED and effects[0].summary["failures"] == 3  # type: ignore[union-attr]
    assert effects[0].summary["message"].endswith("last SNAPSHOT_INCOMPLETE: missing shard")  # type: ignore[union-attr]


def _plain(state: S, event: L.Event) -> tuple[S, list[L.Effect]]:
    return L.reduce(state, event, [], 0.0, R)


def test_a_stop_drains_only_a_serving_worker_then_stops_it() -> None:
    ready = [L.Go(S.DRAINING), L.Drain(), L.StopWorker(), L.FailRequests(), L.Go(S.UNLOADED)]
    assert _plain(S.READY, L.StopRequested()) == (S.UNLOADED, ready)
    for starting in (S.STARTING, S.LOADING, S.CANARY):  # only the canary can be in flight
        assert _plain(starting, L.StopRequested()) == (S.UNLOADED, [e for e in ready if e != L.Drain()])


def test_a_stop_during_backoff_leaves_and_the_due_restart_then_does_nothing() -> None:
    for waiting in (S.BACKOFF, S.ADMITTING, S.REJECTED, S.ROLLING_BACK, S.QUARANTINED):
        assert _plain(waiting, L.StopRequested()) == (S.UNLOADED, [L.StopWorker(), L.Go(S.UNLOADED)])
    assert _plain(S.BACKOFF, L.RestartDue()) == (S.BACKOFF, [L.BringUp()])
    assert _plain(S.UNLOADED, L.RestartDue()) == (S.UNLOADED, [])


def test_a_second_stop_changes_nothing() -> None:
    for s in (S.UNLOADED, S.DRAINING):
        assert _plain(s, L.StopRequested()) == (s, [])


def test_a_worker_exit_while_stopping_is_no_failure() -> None:
    for s in (S.READY, S.DRAINING, S.LOADING):
        assert _plain(s, L.WorkerExited(stopping=True)) == (s, [])


def test_a_death_fails_its_requests_and_only_a_ready_one_becomes_a_failure_task() -> None:
    assert _plain(S.READY, L.WorkerExited(stopping=False)) == (S.READY, [L.WorkerDied(), L.HandleFailure()])
    # During a start, the death is the error of the future the start awaits.
    assert _plain(S.LOADING, L.WorkerExited(stopping=False)) == (S.LOADING, [L.WorkerDied()])


def test_stable_marks_lkg_only_for_the_current_ready_worker() -> None:
    assert _plain(S.READY, L.Stable(current=True)) == (S.READY, [L.MarkStable()])
    assert _plain(S.READY, L.Stable(current=False)) == (S.READY, [])
    assert _plain(S.BACKOFF, L.Stable(current=True)) == (S.BACKOFF, [])


def test_a_start_begins_only_from_unloaded_or_rejected() -> None:
    for s in (S.UNLOADED, S.REJECTED):
        assert _plain(s, L.StartRequested()) == (S.ADMITTING, [L.Go(S.ADMITTING), L.Begin()])
    for s in set(S) - {S.UNLOADED, S.REJECTED}:  # on its way up, serving, failing or quarantined
        assert _plain(s, L.StartRequested()) == (s, [])


def test_a_release_forgives_only_a_quarantined_or_rejected_model() -> None:
    for s in (S.QUARANTINED, S.REJECTED):
        assert _plain(s, L.ReleaseRequested()) == (S.ADMITTING, [L.Forgive(), L.Go(S.ADMITTING), L.Begin()])
    state, effects = _plain(S.READY, L.ReleaseRequested())
    assert state is S.READY and effects == [L.RefuseOperation("is READY, not QUARANTINED or REJECTED")]


def test_a_rollback_from_backoff_is_the_policys_and_any_other_the_operators() -> None:
    assert _plain(S.BACKOFF, L.RollbackRequested("old", "new")) == (S.ROLLING_BACK, [
        L.RunRevision("old"),
        L.Go(S.ROLLING_BACK, (("target_revision", "old"), ("configured_revision", "new"))), L.Begin()])
    for s in (S.READY, S.QUARANTINED, S.UNLOADED):  # stop what runs, then start on the revision, forced
        assert _plain(s, L.RollbackRequested("old", "new")) == (
            S.ADMITTING, [L.StopFirst(), L.RunRevision("old"), L.StartForced()])
