"""Operations' verbs that move models, in-process: real runtimes on FakeWorkers (tests/fakeworker.py),
a real store and real admission of a tiny snapshot, no process and no mlx. A swap brings NEW up
before OLD stops when memory allows and drains OLD first when it does not; a NEW that fails leaves
OLD serving and no alias; the drain cuts a verb's wait short; eviction takes the least recently used
idle model; the idle unloader unloads a model nobody used for its idle_ttl_s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protocol import errors as E
from supervisor import config as cfg_mod
from supervisor.admission import memory
from supervisor.admission.memory import MemoryLedger
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.lifecycle.states import ModelState as S
from supervisor.operations.status import ProcessFigures
from supervisor.operations.verbs import Operations
from supervisor.persistence.store import Store
from supervisor.services import Services
from tests.fakeworker import FakeFactory
from tests.lifecycle_rig import Published, inloop

pytestmark = pytest.mark.timeout(30)


async def _until(done) -> None:
    while not done():
        await asyncio.sleep(0.005)


class Setup:
    """Two models (a, b) on one tiny snapshot, under one Operations, on one fake factory."""

    def __init__(self, tmp_path: Path, model_dir: Path, budget_models: float | None = None,
                 supervisor: str = "", restart: str = "", model: str = "") -> None:
        text = (f"[supervisor]\ndrain_grace_s = 2.0\nstop_timeout_s = 1.0\n{supervisor}\n"
                f"[restart]\nbackoff_initial_s = 0.01\nbackoff_max_s = 0.02\nstable_after_s = 3600\n{restart}\n"
                + "".join(f'[[models]]\nid = "{m}"\npath = "{model_dir}"\n{model}\n' for m in ("a", "b")))
        config = cfg_mod.parse(text)
        self.need = memory.estimate(str(model_dir), config.models[0].context_tokens)["total"]
        budget = 2**62 if budget_models is None else int(self.need * budget_models)
        (tmp_path / "state").mkdir(exist_ok=True)
        self.store = Store(tmp_path / "state")
        self.store.boot()
        self.published, self.factory = Published(), FakeFactory()
        self.ledger = MemoryLedger(budget)
        services = Services(config, self.store, None, "ipc://unused", ledger=self.ledger,
                            events=self.published,  # type: ignore[arg-type]
                            evict=lambda model_id, need: self.ops.evict_for(model_id, need))
        self.ops = Operations(services, ProcessFigures(tmp_path, safe_mode=False),
                              runtime=lambda m, s: ModelRuntime(m, s, factory=self.factory))
        self.a, self.b = self.ops.models["a"], self.ops.models["b"]

    def events(self, name: str) -> list[dict]:
        return [f for e, f in self.published.events if e == name]

    def order(self) -> list[str]:
        """The swap's steps and each model's state changes, in the order they happened."""
        out = []
        for e, f in self.published.events:
            if e == "model.state":
                out.append(f"{f['model']}:{f['to']}")
            elif e.startswith("model.swap"):
                out.append(e)
        return out

    async def ready(self, *rts: ModelRuntime) -> None:
        for rt in rts:
            rt.start("load", wanted=True)
        for rt in rts:
            await asyncio.wait_for(rt.until(lambda rt=rt: rt.state is S.READY), 5)


@inloop
async def test_a_swap_with_room_brings_new_up_before_old_stops_and_aliases_old_to_new(tmp_path: Path,
                                                                                   tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model)
    await s.ready(s.a)
    detail = await s.ops.swap("a", "b")
    assert detail == {"mode": "new first", "old": "a", "new": "b", "state": "READY"}
    order = s.order()
    assert order.index("b:READY") < order.index("a:DRAINING") < order.index("model.swapped")
    assert s.a.state is S.UNLOADED and s.a.wanted() is False  # the operator's word: it stays out
    assert s.ops.runtime("a") is s.b and dict(s.ops.aliases) == {"a": "b"} == s.store.aliases()
    sup, (a, b) = s.ops.status()  # typed entries, read from the table as the swap left it
    assert (a.id, a.state, a.worker_pid, b.state, b.worker_pid) == ("a", "UNLOADED", None, "READY",
                                                                  s.factory.last.process.pid)
    assert b.group is None and b.wanted is True and sup["draining"] is False


@inloop
async def test_a_swap_without_room_drains_old_before_new_starts(tmp_path: Path, tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model, budget_models=1.5)  # one model fits, not two
    await s.ready(s.a)
    detail = await s.ops.swap("a", "b")
    assert detail["mode"] == "old drained first" and detail["state"] == "READY"
    order = s.order()
    assert order.index("a:UNLOADED") < order.index("b:ADMITTING") < order.index("b:READY")
    assert s.ops.runtime("a") is s.b


@inloop
async def test_a_new_model_that_fails_to_come_up_leaves_old_serving_and_no_alias(tmp_path: Path,
                                                                                tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model, restart="quarantine_after = 1\nwindow_s = 60")
    await s.ready(s.a)
    s.factory.next_worker(ready=E.LoadFailed("weights do not load"))
    with pytest.raises(E.LmxError):
        await s.ops.swap("a", "b")
    assert s.b.state is S.QUARANTINED and s.a.state is S.READY
    assert dict(s.ops.aliases) == {} and s.store.aliases() == {} and s.ops.runtime("a") is s.a
    assert not s.events("model.swapped")


@inloop
async def test_the_drain_cuts_a_verbs_wait_for_a_model_short(tmp_path: Path, tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model)
    await s.ready(s.a)
    s.factory.next_worker(ready=False)  # b loads until told: the swap waits for it
    swap = asyncio.ensure_future(s.ops.swap("a", "b"))
    await asyncio.wait_for(s.b.until(lambda: s.b.state is S.LOADING), 5)
    s.ops.drain()
    with pytest.raises(E.LmxError):
        await asyncio.wait_for(swap, 2)  # not its load and canary timeouts (minutes)
    assert s.a.state is S.READY and dict(s.ops.aliases) == {}  # it stopped before the alias step
    with pytest.raises(E.ShuttingDown):
        await s.ops.release("a")
    await s.ops.stop_all("test", 5)  # what shutdown does next: every model stops
    assert s.a.state is S.UNLOADED and s.b.state is S.UNLOADED


@inloop
async def test_eviction_unloads_the_least_recently_used_idle_model_until_the_need_fits(tmp_path: Path,
                                                                                      tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model, supervisor='evict = "lru"')
    await s.ready(s.a, s.b)
    s.a.last_used, s.b.last_used = 1.0, 2.0  # a is the older
    s.ledger.budget = int(s.need * 2.5)  # a third model fits once one of the two has gone
    assert await s.ops.evict_for("c", s.need) is True
    assert s.a.state is S.UNLOADED and s.b.state is S.READY
    (evicted,) = s.events("model.evicted")
    assert (evicted["model"], evicted["for_model"]) == ("a", "c")
    assert s.a.wanted() is True  # an eviction is not the operator's unload


@inloop
async def test_without_lru_nothing_is_evicted(tmp_path: Path, tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model)
    await s.ready(s.a)
    s.ledger.budget = s.need  # no room for another
    assert await s.ops.evict_for("c", s.need) is False
    assert s.a.state is S.READY and not s.events("model.evicted")


@inloop
async def test_the_idle_unloader_unloads_a_model_nobody_used_for_its_ttl(tmp_path: Path, tiny_model: Path) -> None:
    s = Setup(tmp_path, tiny_model, model="idle_ttl_s = 0.2")
    await s.ready(s.a)
    idle = asyncio.ensure_future(s.ops.unload_idle())
    try:
        await asyncio.wait_for(s.a.until(lambda: s.a.state is S.UNLOADED), 5)
    finally:
        idle.cancel()
    await asyncio.wait_for(_until(lambda: s.a.idled_out), 5)  # set once the stop it awaited returns
    assert s.a.wanted() is True  # not the operator's unload: the next request brings it back
    assert [e["model"] for e in s.events("model.idle_unloaded")] == ["a"]
