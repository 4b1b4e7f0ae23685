"""A model's failures in-process, on FakeWorkers: each death is one reducer pass wherever it comes,
a failure restarts after its backoff, repeated ones roll back to the last-known-good revision or
quarantine, an operator releases or rolls back, a group's rank failing is the group's failure. Each
asserts what was done (the store, the worker, the requests), and the last test that every effect
the reducer can return was performed by some runtime of these two files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.messages import Error
from supervisor.lifecycle import effects as X
from supervisor.lifecycle.states import ModelState as S
from tests.fakeworker import FakeFactory, answer_final
from tests.snapshots import write_tiny_llama
from tests.lifecycle_rig import PERFORMED, RIGGED, Client, Rig, inloop, performed, request, rig

pytestmark = pytest.mark.timeout(30)


def _crashes(r: Rig) -> list[dict]:
    return r.store.crashes("m")


async def _ready(r: Rig) -> None:
    r.rt.start("load", wanted=True)
    await r.until(S.READY)


# --- one death, one pass, wherever it comes ---------------------------------------------------------


@inloop
async def test_a_ready_workers_death_is_one_failure_its_requests_hear_after_the_store(tmp_path: Path,
                                                                                     tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    await _ready(r)
    w = r.factory.last
    w.answer = None
    heard: list[tuple[Error, int]] = []  # what the client got, and how many failures the store held then
    r.rt.submit(request(), lambda msg: heard.append((msg, len(r.store.failures("m", 0)))))  # type: ignore[arg-type]
    w.die(E.ErrorCode.WORKER_OOM, "bad_alloc")
    await r.until(S.READY)  # restarted, on a second worker
    ((msg, stored),) = heard
    assert stored == 1 and msg.to_exc().code is E.ErrorCode.WORKER_OOM  # durable before observable
    assert [f.code for f in r.store.failures("m", 0)] == ["WORKER_OOM"] and r.rt.restarts == 1  # one pass
    (crash,) = _crashes(r)
    assert (crash["code"], crash["phase"], crash["worker_pid"], crash["request_id"]) == (
        "WORKER_OOM", "READY", w.process.pid, "r1")  # RecordCrash
    assert w.closes == ["failed: WORKER_OOM"] and r.store.worker_record("m").pid == r.factory.last.process.pid
    assert ("READY", "BACKOFF") in r.states() and ("BACKOFF", "STARTING") in r.states()
    assert [type(e) for e in performed(r, X.ScheduleRestart)] == [X.ScheduleRestart]


@pytest.mark.parametrize("state", ["STARTING", "LOADING", "CANARY"])
@inloop
async def test_a_death_on_the_way_up_is_one_failure_and_the_way_up_ends(tmp_path: Path, tiny_model: Path,
                                                                       state: str) -> None:
    kw = {"STARTING": {"hello": False}, "LOADING": {"ready": False}, "CANARY": {"answer": None}}[state]
    r = rig(tmp_path, tiny_model, FakeFactory(**kw), restart="backoff_initial_s = 30\nbackoff_max_s = 60")
    r.rt.start("load")
    await r.until(S[state])
    r.factory.last.die()
    await r.until(S.BACKOFF)
    await asyncio.sleep(0.02)  # the gap under test: a way up still running would fail a second time
    assert [f.code for f in r.store.failures("m", 0)] == ["WORKER_CRASHED"] and r.rt.restarts == 1
    (crash,) = _crashes(r)
    assert crash["phase"] == state and crash["request_id"] == ("canary" if state == "CANARY" else None)
    assert r.rt.last_error is not None and r.rt.last_error.code is E.ErrorCode.WORKER_CRASHED
    assert r.rt.state is S.BACKOFF and r.rt.worker is None and r.rt.retry_after_s() > 20  # RetryHint
    await r.rt.stop("done")


@inloop
async def test_a_start_failure_backs_off_then_restarts_on_a_new_worker(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.factory.next_worker(ready=E.LoadFailed("weights did not load"))
    await _ready(r)
    first, second = r.factory.workers
    assert first.closes == ["failed: LOAD_FAILED"] and r.rt.worker is second
    assert [f.code for f in r.store.failures("m", 0)] == ["LOAD_FAILED"]
    assert r.states()[:5] == [("UNLOADED", "ADMITTING"), ("ADMITTING", "STARTING"), ("STARTING", "LOADING"),
                              ("LOADING", "BACKOFF"), ("BACKOFF", "STARTING")]
    backoff = [f for e, f in r.published.events if e == "model.state" and f["to"] == "BACKOFF"][0]
    assert backoff["code"] == "LOAD_FAILED" and backoff["failures_in_window"] == 1
    failed = [f for e, f in r.published.events if e == "model.failed"]
    assert len(failed) == 1 and failed[0]["code"] == "LOAD_FAILED" and failed[0]["phase"] == "LOADING"


@inloop
async def test_a_spawn_that_fails_is_a_start_failure_with_no_worker(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    r.factory.fail_next_spawn(E.LoadFailed("no such command"))
    await _ready(r)
    (crash,) = _crashes(r)
    assert crash["code"] == "LOAD_FAILED" and crash["worker_pid"] is None and len(r.factory.workers) == 1


@inloop
async def test_a_canary_that_meets_its_peer_lost_is_no_canary_failure(tmp_path: Path, tiny_model: Path) -> None:
    # A group's rank 0 answers the canary with the peer's loss before the group's death is concluded:
    # a worker went away under the canary, which says nothing about the model (no CANARY_FAILED).
    def lost(msg):  # type: ignore[no-untyped-def]
        return [Error.from_exc(msg.request_id, E.PeerUnavailable("peer 'b' lost", rank=1, host="b"))]

    r = rig(tmp_path, tiny_model, FakeFactory(answer=lost), restart="backoff_initial_s = 30\nbackoff_max_s = 60")
    r.rt.start("load")
    await r.until(S.BACKOFF)
    assert [f.code for f in r.store.failures("m", 0)] == ["PEER_UNAVAILABLE"]
    assert r.rt.last_error is not None and r.rt.last_error.code is E.ErrorCode.PEER_UNAVAILABLE
    await r.rt.stop("done")


@inloop
async def test_a_canary_with_a_wrong_answer_is_a_canary_failure(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(answer=answer_final("nope")),
            restart="backoff_initial_s = 30\nbackoff_max_s = 60", model='canary = { expect = "hello" }')
    r.rt.start("load")
    await r.until(S.BACKOFF)
    assert [f.code for f in r.store.failures("m", 0)] == ["CANARY_FAILED"]
    await r.rt.stop("done")


@pytest.mark.parametrize("tokens", [0, 1])
@inloop
async def test_a_canary_answered_by_the_end_token_alone_is_a_canary_failure(tmp_path: Path, tiny_model: Path,
                                                                           tokens: int) -> None:
    # usage counts the end-of-text token: an answer that is only that token said nothing.
    r = rig(tmp_path, tiny_model, FakeFactory(answer=answer_final("", tokens=tokens)),
            restart="backoff_initial_s = 30\nbackoff_max_s = 60")
    r.rt.start("load")
    await r.until(S.BACKOFF)
    assert [f.code for f in r.store.failures("m", 0)] == ["CANARY_FAILED"]
    assert r.rt.last_error is not None and "no tokens" in r.rt.last_error.message
    await r.rt.stop("done")


@inloop
async def test_a_canary_that_reads_otherwise_than_on_this_stack_before_fails(tmp_path: Path, tiny_model: Path) -> None:
    # The registry's verdict on the canary's text is part of the canary: corrupt weights or a kernel.
    r = rig(tmp_path, tiny_model, restart="backoff_initial_s = 30\nbackoff_max_s = 60")
    await _ready(r)
    await r.rt.stop("unload")
    r.factory.worker_kw["answer"] = answer_final("something else")
    r.rt.start("load")
    await r.until(S.BACKOFF)
    assert [f.code for f in r.store.failures("m", 0)] == ["CANARY_FAILED"]
    assert "differs from this stack's earlier output" in r.rt.last_error.message  # type: ignore[union-attr]
    assert r.factory.last.closes == ["failed: CANARY_FAILED"]
    await r.rt.stop("done")


@inloop
async def test_a_groups_rank_failing_is_the_groups_one_failure_naming_the_rank(tmp_path: Path,
                                                                             tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, model='max_batch_size = 1\ngroup = { hosts = ["local", "local"] }')
    await _ready(r)
    assert r.factory.groups == ["m"] and r.reasons()[2:4] == ["handshake done with every rank",
                                                             "weights loaded on every rank"]
    assert r.store.worker_record("m") is None  # a group's ranks end with their supervisor: nothing to adopt
    r.factory.last.die(rank=1, host="local")
    await r.until(S.READY)
    (crash,) = _crashes(r)
    assert (crash["rank"], crash["host"]) == (1, "local") and len(r.factory.groups) == 2


# --- repeated failures: quarantine, rollback ------------------------------------------------------


@inloop
async def test_failures_past_the_threshold_quarantine_durably_and_requests_get_the_summary(tmp_path: Path,
                                                                                          tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, FakeFactory(ready=E.LoadFailed("bad weights")), restart="quarantine_after = 2")
    r.rt.start("load")
    await r.until(S.QUARANTINED)
    flags = r.store.flags("m")
    assert flags.quarantined and flags.quarantine["failures"] == 2  # PersistQuarantine
    assert r.states()[-2:] == [("LOADING", "BACKOFF"), ("BACKOFF", "QUARANTINED")]
    with pytest.raises(E.ModelQuarantined, match="2 failures in 600s, last LOAD_FAILED: bad weights"):
        r.rt.submit(request(), Client())
    assert r.rt.retry_after_s() == 1.0 and len(r.factory.workers) == 2


@inloop
async def test_a_release_forgets_the_failures_and_reads_every_file_again(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model, restart="quarantine_after = 1")
    r.factory.next_worker(ready=E.LoadFailed("bad weights"))
    r.rt.start("load")
    await r.until(S.QUARANTINED)
    assert await r.rt.release() == "ADMITTING"
    await r.until(S.READY)
    assert r.store.failures("m", 0) == [] and not r.store.flags("m").quarantined  # ForgetFailures
    assert r.rt.consecutive_failures == 0 and r.rt.last_error is None and r.rt.wanted() is True
    (_, up) = performed(r, X.BringUp)
    assert (up.admit, up.force, up.doubt) == (True, True, True)


@inloop
async def test_a_release_of_a_serving_model_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    r = rig(tmp_path, tiny_model)
    await _ready(r)
    with pytest.raises(E.BadRequest, match="is READY, not QUARANTINED or REJECTED"):
        await r.rt.release()
    assert r.rt.state is S.READY


@inloop
async def test_a_refused_snapshot_is_rejected_until_it_is_fixed_and_released(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    r = rig(tmp_path, model)
    r.rt.start("load")
    await r.until(S.REJECTED)
    assert r.rt.last_error is not None and r.factory.workers == []  # Reject: no worker was ever spawned
    with pytest.raises(type(r.rt.last_error)):
        r.rt.submit(request(), Client())
    write_tiny_llama(model)
    await r.rt.release()
    await r.until(S.READY)


def _revisions(tmp_path: Path, tiny_model: Path) -> tuple[Rig, Rig]:
    """The same store under two configs of "m": `old` (the tiny model), then `new` (another snapshot),
    as a reload makes them: the old one is recorded, and made last-known-good by the caller."""
    old = rig(tmp_path, tiny_model, restart="quarantine_after = 2\nstable_after_s = 0.01")
    new_model = write_tiny_llama(tmp_path / "new", seed=1)
    # LOAD_TIMEOUT is no compat evidence: the registry does not refuse the old revision for it.
    new = rig(tmp_path, new_model, FakeFactory(ready=E.LoadTimeout("no ready")), store=old.store,
              restart="quarantine_after = 2")
    return old, new


async def _lkg(old: Rig) -> str:
    await _ready(old)
    while old.store.flags("m").lkg_revision is None:
        await asyncio.sleep(0.005)
    await old.rt.stop("reload", remember=False)
    return old.rt.cfg.revision


@inloop
async def test_a_revision_that_keeps_failing_rolls_back_to_the_last_known_good(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    old, new = _revisions(tmp_path, tiny_model)
    lkg = await _lkg(old)
    new.factory.worker_kw["ready"] = True  # the rollback's worker loads (only the first two fail)
    new.factory.next_worker(ready=E.LoadTimeout("no ready"))
    new.factory.next_worker(ready=E.LoadTimeout("no ready"))
    new.rt.start("reload")
    await new.until(S.READY)
    assert new.rt.running.revision == lkg != new.rt.cfg.revision  # RunRevision
    assert ("BACKOFF", "ROLLING_BACK") in new.states() and ("ROLLING_BACK", "STARTING") in new.states()
    rolling = [f for e, f in new.published.events if e == "model.state" and f["to"] == "ROLLING_BACK"][0]
    assert (rolling["target_revision"], rolling["configured_revision"]) == (lkg, new.rt.cfg.revision)
    assert new.store.flags("m").running_revision == lkg


@inloop
async def test_a_rollback_whose_revision_fails_too_is_quarantined(tmp_path: Path, tiny_model: Path) -> None:
    old, new = _revisions(tmp_path, tiny_model)
    await _lkg(old)
    new.rt.start("reload")  # every worker fails: the new revision twice, then the old one twice
    await new.until(S.QUARANTINED)
    codes = [f.revision for f in new.store.failures("m", 0)]
    assert codes == [new.rt.cfg.revision] * 2 + [old.rt.cfg.revision] * 2 and len(new.factory.workers) == 4


@inloop
async def test_a_rollback_whose_snapshot_is_refused_is_quarantined_never_spawned(tmp_path: Path,
                                                                                tiny_model: Path) -> None:
    lkg_model = write_tiny_llama(tmp_path / "lkg")
    old = rig(tmp_path, lkg_model, restart="quarantine_after = 2\nstable_after_s = 0.01")
    new = rig(tmp_path, tiny_model, FakeFactory(ready=E.LoadTimeout("no ready")), store=old.store,
              restart="quarantine_after = 2")
    await _lkg(old)
    (lkg_model / "config.json").unlink()  # the last-known-good's snapshot is no longer whole
    new.rt.start("reload")
    await new.until(S.QUARANTINED)
    assert ("ROLLING_BACK", "QUARANTINED") in new.states() and ("ROLLING_BACK", "STARTING") not in new.states()
    assert len(new.factory.workers) == 2 and new.store.flags("m").quarantined


@inloop
async def test_an_operators_rollback_stops_what_runs_and_starts_the_revision_forced(tmp_path: Path,
                                                                                   tiny_model: Path) -> None:
    old, new = _revisions(tmp_path, tiny_model)
    lkg = await _lkg(old)
    new.factory.worker_kw["ready"] = True
    await _ready(new)
    serving = new.factory.last
    new.store.set_quarantine("m", {"failures": 9, "message": "stale"})
    assert await new.rt.rollback(None, "operator") == "ADMITTING"
    await new.until(S.READY)
    assert serving.closes == [f"operator rollback to {lkg}"] and new.rt.running.revision == lkg
    assert not new.store.flags("m").quarantined and new.rt.wanted() is True  # LiftQuarantine, Remember
    after = new.states()[new.states().index(("CANARY", "READY")) + 1:]
    assert after == [("READY", "DRAINING"), ("DRAINING", "UNLOADED"), ("UNLOADED", "ADMITTING"),
                     ("ADMITTING", "STARTING"), ("STARTING", "LOADING"), ("LOADING", "CANARY"), ("CANARY", "READY")]
    (up,) = performed(new, X.BringUp)[-1:]
    assert up.force is True
    with pytest.raises(E.BadRequest, match="no known revision"):
        await new.rt.rollback("nope", "operator")


def test_every_effect_the_reducer_can_return_was_performed() -> None:
    # What both files' runtimes performed, through their one _perform: it needs both to have run.
    if RIGGED != {"test_lifecycle_inprocess", "test_lifecycle_inprocess_failures"}:
        pytest.skip("reads what the other in-process lifecycle tests performed: run both files")
    assert set(X.Effect.__args__) - PERFORMED == set()  # type: ignore[attr-defined]
