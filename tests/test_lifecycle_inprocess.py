"""A model's lifecycle in-process, on FakeWorkers (tests/fakeworker.py): a real ModelRuntime, a real
store in tmp_path and real admission of a tiny snapshot, no process and no mlx, so each test runs in
milliseconds. Each asserts what the runtime did (the worker told and stopped, the store written, the
requests answered), not only what the reducer said. This file: the way up, stopping and draining,
adoption, requests, the prefix-cache clear; the failures are in test_lifecycle_inprocess_failures.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from structlog.testing import capture_logs

from protocol import errors as E
from protocol.messages import ClearPrefixCache, Final, GenerateRequest, Init
from supervisor import config as cfg_mod
from supervisor.admission.memory import MemoryLedger, estimate
from supervisor.lifecycle import effects as X
from supervisor.lifecycle.states import ModelState as S
from supervisor.persistence.records import WorkerRecord
from supervisor.persistence.store import Store
from supervisor.workers import adoption
from tests.fakeworker import FakeFactory
from tests.lifecycle_rig import Client, inloop, performed, request, rig, toml

pytestmark = pytest.mark.timeout(30)

# --- the way up ------------------------------------------------------------------------------------


@inloop
async def test_a_start_goes_up_step_by_step_to_ready_and_records_the_serving_worker(tmp_path: Path,
                                                                                   tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    assert r.rt.start("load", wanted=True) is True and r.rt.start("again") is False
    await r.until(S.READY)
    assert r.states() == [("UNLOADED", "ADMITTING"), ("ADMITTING", "STARTING"), ("STARTING", "LOADING"),
                          ("LOADING", "CANARY"), ("CANARY", "READY")]
    assert r.reasons() == ["load", "spawn", "handshake done", "weights loaded", "canary passed"]
    w = r.factory.last
    assert r.factory.spawns == ["m"] and r.rt.worker is w  # Spawn, TakeWorker
    assert [type(m) for m in w.told] == [Init] and w.told[0].revision == r.rt.cfg.revision  # Greet
    (canary,) = w.sent  # RunCanary: the canary is the only request, greedy
    assert isinstance(canary, GenerateRequest) and canary.temperature == 0.0
    assert r.rt.canary is not None and r.rt.canary["tokens"] == 1  # KeepCanary
    assert r.store.worker_record("m").pid == w.process.pid  # RecordWorker: the next run can adopt it
    assert r.rt.wanted() is True and r.rt.retry_after_s() == 1.0  # Remember; RetryHint(None)
    assert r.rt.ready_since is not None and r.rt.state is S.READY


@inloop
async def test_a_warm_spare_is_taken_when_the_factory_has_one(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(spares=1))
    r.rt.start("load")
    await r.until(S.READY)
    assert (r.factory.spares_taken, r.factory.spawns) == (["m"], [])


@inloop
async def test_a_ready_worker_that_stays_stable_makes_its_revision_last_known_good(tmp_path: Path,
                                                                                  tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, restart="stable_after_s = 0.05")
    r.rt.consecutive_failures = 2  # as after two failures
    r.rt.start("load")
    await r.until(S.READY)
    assert r.store.flags("m").lkg_revision is None
    (arm,) = performed(r, X.ArmStable)
    assert arm.after_s == 0.05
    await asyncio.wait_for(_until_true(lambda: performed(r, X.MarkStable)), 5)
    assert r.store.flags("m").lkg_revision == r.rt.running.revision and r.rt.consecutive_failures == 0


async def _until_true(pred: Callable[[], Any]) -> None:
    while not pred():
        await asyncio.sleep(0.005)


@inloop
async def test_a_worker_replaced_before_it_is_stable_makes_nothing_last_known_good(tmp_path: Path,
                                                                                  tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, restart="stable_after_s = 0.05")
    r.rt.start("load")
    await r.until(S.READY)
    await r.rt.stop("unload")  # the stop cancels the timer with the worker
    await asyncio.sleep(0.1)  # past stable_after_s: the gap under test
    assert not performed(r, X.MarkStable) and r.store.flags("m").lkg_revision is None


# --- requests ------------------------------------------------------------------------------------


@inloop
async def test_only_ready_takes_requests_and_each_waiting_state_says_how_long_to_wait(tmp_path: Path,
                                                                                     tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(hello=False))
    with pytest.raises(E.ModelNotReady, match="is UNLOADED"):
        r.rt.submit(request(), Client())
    r.rt.start("load")
    await r.until(S.STARTING)
    with pytest.raises(E.ModelNotReady) as starting:
        r.rt.submit(request(), Client())
    assert starting.value.details["state"] == "STARTING" and "retry_after_s" in starting.value.details
    r.factory.last.say_hello()
    await r.until(S.READY)
    client = Client()
    r.rt.submit(request(), client)
    await asyncio.wait_for(client.done.wait(), 5)
    assert isinstance(client.got[-1], Final) and client.got[-1].text == "ok"


@inloop
async def test_a_request_for_a_model_unloaded_for_idleness_brings_it_back(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.rt.start("load")
    await r.until(S.READY)
    await r.rt.stop("idle", remember=False)
    r.rt.idled_out = True  # as the daemon's idle unloader sets it
    with pytest.raises(E.ModelNotReady, match="unloaded for idleness"):
        r.rt.submit(request(), Client())
    await r.until(S.READY)
    assert r.rt.idled_out is False and len(r.factory.workers) == 2


@inloop
async def test_a_prefix_cache_clear_reaches_the_worker_on_its_requests_way(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.rt.start("load")
    await r.until(S.READY)
    r.rt.clear_prefix_cache()
    assert isinstance(r.factory.last.sent[-1], ClearPrefixCache)


# --- stopping and draining -------------------------------------------------------------------------


@inloop
async def test_a_stop_drains_the_requests_in_flight_before_it_stops_the_worker(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.rt.start("load")
    await r.until(S.READY)
    w = r.factory.last
    w.answer = None  # requests stay in flight until the test answers them
    client = Client()
    r.rt.submit(request(), client)
    stopping = asyncio.ensure_future(r.rt.stop("unload"))
    await r.until(S.DRAINING)
    assert not w.closes and not stopping.done()  # Drain: it waits for the request
    wrid = w.sent[-1].request_id
    w.reply(Final(wrid, "done", "stop", {"completion_tokens": 1}))
    await asyncio.wait_for(stopping, 5)
    assert isinstance(client.got[-1], Final) and client.got[-1].text == "done"  # served, not cut off
    assert w.closes == ["unload"] and r.rt.worker is None and r.store.worker_record("m") is None  # StopWorker
    assert r.states()[-2:] == [("READY", "DRAINING"), ("DRAINING", "UNLOADED")] and r.rt.wanted() is False


@inloop
async def test_a_drain_is_bounded_and_what_is_left_fails_shutting_down(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, supervisor="drain_grace_s = 0.05")
    r.rt.start("load")
    await r.until(S.READY)
    r.factory.last.answer = None
    client = Client()
    r.rt.submit(request(), client)
    await r.rt.stop("unload")
    assert client.error is not None and client.error.code is E.ErrorCode.SHUTTING_DOWN  # FailRequests
    assert client.error.message == "model stopped: unload" and r.rt.state is S.UNLOADED


@inloop
async def test_a_stop_racing_a_load_ends_it_and_the_late_ready_changes_nothing(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(ready=False))
    r.rt.start("load")
    await r.until(S.LOADING)
    w = r.factory.last
    await r.rt.stop("unload")
    assert r.rt.state is S.UNLOADED and w.closes == ["unload"] and performed(r, X.CancelTask)
    w.say_ready()  # the load it was racing finishes after all
    await asyncio.sleep(0.02)  # the gap under test: a way up still running would go on to CANARY now
    assert r.rt.state is S.UNLOADED and not w.sent and r.states()[-1] == ("DRAINING", "UNLOADED")


@inloop
async def test_a_canary_cut_short_by_a_stop_is_no_failure_of_the_model(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(answer=None))
    r.rt.start("load")
    await r.until(S.CANARY)
    await r.rt.stop("unload")
    assert r.rt.state is S.UNLOADED and r.rt.restarts == 0 and r.rt.last_error is None
    assert r.store.failures("m", 0) == [] and r.store.crashes("m") == []
    assert all(row["outcome"] != "failed" for row in r.store.compat())


@inloop
async def test_a_model_that_does_not_fit_is_rejected_with_no_worker_until_memory_is_freed(tmp_path: Path,
                                                                                          tiny_model: Path) -> None:
    config = cfg_mod.parse(toml(tiny_model)).models[0]
    one = estimate(config.path, config.context_tokens)["total"]
    ledger = MemoryLedger(one + one // 2)  # room for one, not two
    a = rig(tmp_path, tiny_model, ledger=ledger)
    b = rig(tmp_path, tiny_model, store=a.store, ledger=ledger, model_id="b")
    a.rt.start("load")
    await a.until(S.READY)
    b.rt.start("load")
    await b.until(S.REJECTED)
    assert b.rt.last_error is not None and b.rt.last_error.code is E.ErrorCode.INSUFFICIENT_MEMORY
    assert f"{one + one // 2:,}-byte budget" in b.rt.last_error.message and b.factory.workers == []
    with pytest.raises(E.InsufficientMemory):  # Reject: requests get the refusal itself
        b.rt.submit(request(), Client())
    await a.rt.stop("unload")  # UNLOADED releases its reservation (part of the state change)
    assert b.rt.start("load") is True
    await b.until(S.READY)


@inloop
async def test_a_death_during_a_drain_fails_its_requests_and_is_no_failure(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.rt.start("load")
    await r.until(S.READY)
    w = r.factory.last
    w.answer = None
    client = Client()
    r.rt.submit(request(), client)
    stopping = asyncio.ensure_future(r.rt.stop("unload"))
    await r.until(S.DRAINING)
    w.die()
    await asyncio.wait_for(stopping, 5)
    assert client.error is not None and client.error.code is E.ErrorCode.WORKER_CRASHED  # FailRequests
    assert performed(r, X.ForgetWorker) and r.store.worker_record("m") is None
    assert r.rt.state is S.UNLOADED and r.rt.restarts == 0 and r.store.failures("m", 0) == []


@inloop
async def test_a_stop_while_admitting_or_in_backoff_leaves_at_once(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, restart="backoff_initial_s = 30\nbackoff_max_s = 60")
    r.factory.fail_next_spawn(E.LoadFailed("no"))
    r.rt.start("load")
    await r.until(S.BACKOFF)
    await r.rt.stop("unload")
    assert r.states()[-1] == ("BACKOFF", "UNLOADED") and r.rt.state is S.UNLOADED
    await asyncio.sleep(0)  # a cancelled task ends at its next step
    assert all(t.done() for t in r.rt._tasks)  # the restart's wait was cancelled with it


# --- adoption --------------------------------------------------------------------------------------


def _orphan(store: Store, revision: str, pid: int = 4242) -> WorkerRecord:
    record = adoption.worker_record(pid, 1234.5, "tok", revision, "ipc://unused", store.boot_id)
    store.set_worker("m", record)
    return record


def _store(tmp_path: Path) -> Store:
    (tmp_path / "state").mkdir(exist_ok=True)
    store = Store(tmp_path / "state")
    store.boot()
    return store


@inloop
async def test_a_previous_runs_worker_that_proves_itself_is_adopted_without_a_load(tmp_path: Path,
                                                                                  tiny_model: Path) -> None:
    store = _store(tmp_path)
    revision = cfg_mod.parse(toml(tiny_model)).models[0].revision
    _orphan(store, revision)
    r = rig(tmp_path, tiny_model, store=store)
    r.factory.next_adoption()
    r.rt.start("autoload")
    await r.until(S.READY)
    assert r.factory.adoptions == [4242] and r.factory.proofs == [(4242, None)] and r.factory.spawns == []
    assert r.states()[1:3] == [("ADMITTING", "STARTING"), ("STARTING", "CANARY")]
    assert r.reasons()[1:3] == ["adopting worker pid 4242", "adopted: weights already loaded"]
    assert r.rt.worker is r.factory.last and r.rt.worker.process.pid == 4242 and not r.factory.last.told[1:]


@inloop
async def test_an_adoption_not_proved_ends_that_worker_and_spawns_a_fresh_one_without_a_failure(
        tmp_path: Path, tiny_model: Path) -> None:
    store = _store(tmp_path)
    revision = cfg_mod.parse(toml(tiny_model)).models[0].revision
    for present, why in ((False, None), (True, "its hello names another token")):
        _orphan(store, revision)
        r = rig(tmp_path, tiny_model, store=store)
        r.factory.next_adoption(present, why)
        r.rt.start("autoload")
        await r.until(S.READY)
        assert r.factory.spawns == ["m"] and r.rt.restarts == 0 and store.failures("m", 0) == []
        if present:  # the one that did not prove itself is stopped, never served
            assert r.factory.workers[0].closes == [f"adoption refused: {why}"] and not r.factory.workers[0].sent
        assert r.rt.worker is r.factory.last and performed(r, X.ForgetWorker)
        await r.rt.stop("next")


@inloop
async def test_an_orphan_of_another_revision_is_ended_and_a_worker_spawned(tmp_path: Path, tiny_model: Path) -> None:
    store = _store(tmp_path)
    _orphan(store, "0ld")
    r = rig(tmp_path, tiny_model, store=store)
    r.rt.start("autoload")
    await r.until(S.READY)
    assert r.factory.orphans_ended == [(4242, "its revision 0ld is no longer wanted")] and r.factory.adoptions == []


@inloop
async def test_a_refused_admission_ends_the_orphan_at_once(tmp_path: Path, tiny_model: Path) -> None:
    store = _store(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    revision = cfg_mod.parse(toml(broken)).models[0].revision
    _orphan(store, revision)
    r = rig(tmp_path, broken, store=store)
    r.rt.start("autoload")
    await r.until(S.REJECTED)
    assert r.factory.orphans_ended and r.factory.orphans_ended[0][1].startswith("admission refused")


# --- the restored state, the waits -----------------------------------------------------------------


def test_a_restored_quarantine_is_a_model_state_change_with_its_error(tmp_path: Path, tiny_model: Path) -> None:
    store = _store(tmp_path)
    config = cfg_mod.parse(toml(tiny_model))
    store.remember_revision(config.models[0])
    store.set_wanted("m", True, config.models[0].revision, config.models[0].revision)
    store.set_quarantine("m", {"failures": 3, "window_s": 600.0, "last_code": "WORKER_CRASHED",
                               "revision": config.models[0].revision, "message": "3 failures"})
    with capture_logs() as logged:
        r = rig(tmp_path, tiny_model, store=store)
    assert r.rt.state is S.QUARANTINED
    changes = [e for e in logged if e["event"] == "model.state"]
    assert [(e["from"], e["to"], e["reason"]) for e in changes] == [
        ("UNLOADED", "QUARANTINED", "restored from the store")]
    assert changes[0]["failures"] == 3 and "message" not in changes[0]
    with pytest.raises(E.ModelQuarantined, match="3 failures"):  # RefuseWith
        r.rt.submit(request(), Client())


@inloop
async def test_until_wakes_on_the_state_change_that_makes_it_hold(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(hello=False))
    waiter = asyncio.ensure_future(r.rt.until(lambda: r.rt.state is S.LOADING))
    r.rt.start("load")
    await r.until(S.STARTING)
    early = waiter.done()  # woken by changes, but the condition does not hold yet
    r.factory.last.say_hello()
    await asyncio.wait_for(waiter, 5)
    assert early is False and r.rt.state in (S.LOADING, S.CANARY, S.READY)


@inloop
async def test_a_drain_ends_when_the_last_request_ends(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    # No worker: the request stays queued until its client cancels it.
    wrid = r.rt.requests.add(request(), Client())
    drain = asyncio.ensure_future(r.rt.requests.drained(600))
    await asyncio.sleep(0)
    waiting = not drain.done()
    started = time.monotonic()
    r.rt.cancel(wrid)
    await asyncio.wait_for(drain, 5)
    assert waiting and time.monotonic() - started < 1.0
