"""Operations: the model table and its aliases (written here only), the admin gate and its one drain
flag, and every operator verb on them: load, unload, release, rollback, repair, probe, swap,
reload, cache clear, verify, compat, plus eviction, the idle unloader and the autostart."""

from __future__ import annotations

import asyncio
import time
from types import MappingProxyType
from typing import Any, Callable, Coroutine, Mapping

from protocol import errors as E
from protocol.states import ModelStatus
from supervisor import config as cfg_mod, logs
from supervisor.admission import compat, memory, snapshot
from supervisor.admission.snapshot import Finding
from supervisor.config import Config, ModelConfig
from supervisor.lifecycle import modelstatus
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.lifecycle.states import ModelState
from supervisor.operations import probe, repair
from supervisor.operations.gate import CONFIG_KEY, AdminGate
from supervisor.operations.settle import bring_to_ready
from supervisor.operations.status import ProcessFigures
from supervisor.persistence.store import Retention
from supervisor.services import Services

Detail = dict[str, Any]  # what an operation's Ack carries


class Operations:
    """Each per-model verb runs under its model's lock, on the runtime that is current once the
    lock is held (a reload may have replaced it while the verb waited); none begins once draining.
    Readers (the Router, status, metrics) see the table through `models` and `runtime`, read-only."""

    def __init__(self, services: Services, figures: ProcessFigures,
                 reloaded: Callable[[Config], None] = lambda config: None,
                 runtime: Callable[[ModelConfig, Services], ModelRuntime] = ModelRuntime) -> None:
        self._services = services
        self._figures = figures
        self._reloaded = reloaded  # what else follows a new config (the tcp endpoint's allow-list)
        self._runtime = runtime  # how a model's runtime is made (a test may pass its own)
        self.gate = AdminGate()
        self.log = logs.get()
        self._models = {m.id: runtime(m, services) for m in services.config.models}
        self.models: Mapping[str, ModelRuntime] = MappingProxyType(self._models)
        self._aliases: dict[str, str] = {}  # after `swap OLD NEW`: requests for OLD go to NEW
        self.aliases: Mapping[str, str] = MappingProxyType(self._aliases)
        self._restore_aliases()

    @property
    def config(self) -> Config:
        return self._services.config  # the one current config: a reload replaces it there

    @property
    def draining(self) -> bool:
        return self.gate.draining

    def drain(self) -> None:
        """Shutdown begins: no verb and no request starts from here on, and a verb waiting for a
        model to settle stops waiting (it then stops what it began)."""
        self.gate.drain()

    def runtime(self, name: str) -> ModelRuntime:
        """The runtime serving `name` (a swapped-out name resolves to its successor)."""
        runtime = self._models.get(self._aliases.get(name, name))
        if runtime is None:
            raise E.UnknownModel(f"model {name!r} is not declared", model=name)
        return runtime

    def _current(self, model_id: str) -> ModelRuntime:
        rt = self._models.get(model_id)
        if rt is None:
            raise E.UnknownModel(f"model {model_id!r} is not declared", model=model_id)
        return rt

    def _note(self, level: str, event: str, **fields: Any) -> None:
        """Log a supervisor-level event and publish it on the events socket."""
        getattr(self.log, level)(event, **fields)
        self._services.events.publish(event, **fields)

    def status(self) -> tuple[dict[str, Any], list[ModelStatus]]:
        return (self._figures.supervisor(self._services, self.draining),
                [modelstatus.of(rt) for rt in self._models.values()])

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        self.runtime(name)  # a declared model (or a swapped-out name): its own crash records
        return self._services.store.crashes(name, max(1, min(limit, 500)))

    # -- per-model verbs -------------------------------------------------------------------------

    def load(self, name: str, force: bool = False) -> Coroutine[Any, Any, Detail]:
        """Checked at once, so a request right behind it sees the name taken back (loading a
        swapped-out model drops its alias, in the store too); runs under the lock when awaited."""
        if self.draining:
            raise E.ShuttingDown("supervisor is shutting down")
        if self._aliases.pop(name, None) is not None:
            self._services.store.set_alias(name, None)
        return self._load(self.runtime(name).cfg.id, force)

    async def _load(self, model_id: str, force: bool) -> Detail:
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            started = rt.start("operator load", wanted=True, force=force)
            return {"state": rt.state.value, "started": started}

    def unload(self, name: str) -> Coroutine[Any, Any, Detail]:
        """The name is resolved at once (an unknown one is refused before anything waits)."""
        return self._unload(self.runtime(name).cfg.id)

    async def _unload(self, model_id: str) -> Detail:
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            await rt.stop("operator unload")
            return {"state": rt.state.value}

    async def release(self, name: str) -> Detail:
        model_id = self.runtime(name).cfg.id
        async with self.gate.hold(model_id):
            return {"state": await self._current(model_id).release()}

    async def rollback(self, name: str, revision: str | None) -> Detail:
        model_id = self.runtime(name).cfg.id
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            state = await rt.rollback(revision, "operator rollback")
            return {"state": state, "revision": rt.running.revision}

    async def repair(self, name: str) -> Detail:
        model_id = self.runtime(name).cfg.id
        async with self.gate.hold(model_id):
            # Fetch what admission found missing or corrupt, verify, re-admit.
            return await repair.repair(self._current(model_id))

    def clear_prefix_cache(self, name: str | None) -> tuple[list[str], int, int]:
        """(models cleared, files, bytes): one model's prefix cache, or every model's."""
        chosen = [self.runtime(name)] if name else list(self._models.values())
        files = size = 0
        for rt in chosen:
            cleared = rt.clear_prefix_cache()
            files += cleared.get("files", 0)
            size += cleared.get("bytes", 0)
        return [rt.cfg.id for rt in chosen], files, size

    def verify(self, name: str) -> tuple[str, list[Finding]]:
        """(the snapshot's path, what its checks find): the path of the revision that runs."""
        path = self.runtime(name).running.path
        return path, snapshot.verify(path)

    def compat(self) -> tuple[str, list[dict[str, Any]]]:
        """(this machine's backend, the compatibility registry's rows)."""
        return compat.backend(), self._services.store.compat()

    async def probe(self, path: str) -> Detail:
        if not path:
            raise E.BadRequest("probe needs a path")
        return await probe.probe(path, self._services, self.gate)

    # -- swap and aliases ------------------------------------------------------------------------

    async def swap(self, old_id: str, new_id: str) -> Detail:
        """`_swap` under both models' locks (by their ids, as aliases resolve)."""
        if not old_id or not new_id:
            raise E.BadRequest("swap needs the old and the new model")
        async with self.gate.hold(*(self._aliases.get(m, m) for m in (old_id, new_id))):
            return await self._swap(old_id, new_id)

    async def _swap(self, old_id: str, new_id: str) -> Detail:
        """NEW takes over OLD's requests. When memory allows, NEW reaches READY first and requests
        move over in one step (no moment where neither serves); else OLD is drained first. A NEW
        that fails to come up leaves OLD as it was."""
        old, new = self._current(old_id), self._current(new_id)
        if old is new:
            raise E.BadRequest("swap needs two different models")
        ledger = self._services.ledger
        need = memory.estimate(new.running.path, new.running.context_tokens)["total"]
        fits = new.state is ModelState.READY or ledger.others(new_id) + need <= ledger.budget
        mode = "new first" if fits else "old drained first"
        self._note("info", "model.swap_started", model=old_id, new_model=new_id, mode=mode)
        if fits:
            await bring_to_ready(new, f"swap for {old_id}", self.gate.drained)
            self._alias(old_id, new_id)  # one step: the next request for OLD goes to NEW
            await old.stop(f"swapped for {new_id}")
        else:
            await old.stop(f"swapped for {new_id}")
            self._alias(old_id, new_id)
            await bring_to_ready(new, f"swap for {old_id}", self.gate.drained)
        self._note("info", "model.swapped", model=old_id, new_model=new_id, mode=mode)
        return {"mode": mode, "old": old_id, "new": new_id, "state": new.state.value}

    def _alias(self, old_id: str, new_id: str) -> None:
        """Written before it takes effect: a swap outlives a restart of the supervisor."""
        self._services.store.set_alias(old_id, new_id)
        self._aliases[old_id] = new_id

    def _restore_aliases(self) -> None:
        store = self._services.store
        for old_id, new_id in store.aliases().items():
            if new_id not in self._models:  # the model that took over is no longer declared
                self.log.warning("model.alias_dropped", model=old_id, new_model=new_id,
                                 reason=f"{new_id} is not in the config")
                store.set_alias(old_id, None)
                continue
            self._aliases[old_id] = new_id
            self.log.info("model.alias_restored", model=old_id, new_model=new_id)

    # -- starting, eviction, idleness ------------------------------------------------------------

    def autostart(self, rt: ModelRuntime, reason: str, force: bool = False) -> None:
        """Start `rt` if the operator's last word, else its config, wants it; never while draining."""
        if self.draining:
            return
        wanted = rt.wanted()
        if wanted or (wanted is None and rt.cfg.autoload):
            rt.start(reason, force=force)

    def autostart_all(self, reason: str) -> None:
        for rt in self._models.values():
            self.autostart(rt, reason)

    async def evict_for(self, model_id: str, need: int) -> bool:
        """evict = "lru": unload least recently used idle READY models until `need` fits."""
        if self.config.supervisor.evict != "lru":
            return False
        ledger = self._services.ledger
        idle = sorted((rt for rt in self._models.values()
                       if rt.cfg.id != model_id and rt.state is ModelState.READY and not len(rt.requests)
                       and not rt.cfg.pinned),
                      key=lambda rt: rt.last_used)
        for rt in idle:
            if ledger.others(model_id) + need <= ledger.budget:
                break
            self._note("warning", "model.evicted", model=rt.cfg.id, for_model=model_id, need_bytes=need,
                       budget_bytes=ledger.budget)
            await rt.stop(f"evicted (lru) to make room for {model_id}", remember=False)
        return ledger.others(model_id) + need <= ledger.budget

    async def unload_idle(self) -> None:
        """idle_ttl_s: a READY model nobody used for that long is unloaded (pinned ones never); the
        next request for it loads it again. Runs until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            for model_id in list(self._models):
                if not self.gate.busy(model_id):  # an operator's operation on it comes first
                    async with self.gate.hold(model_id):
                        await self._unload_if_idle(self._models.get(model_id))

    async def _unload_if_idle(self, rt: ModelRuntime | None) -> None:
        now = time.monotonic()
        if rt is None:
            return
        ttl = rt.cfg.idle_ttl_s
        if (ttl <= 0 or rt.cfg.pinned or rt.state is not ModelState.READY or len(rt.requests)
                or now - max(rt.last_used, rt.ready_since or now) < ttl):
            return
        self._note("info", "model.idle_unloaded", model=rt.cfg.id, idle_ttl_s=ttl)
        await rt.stop(f"idle for {ttl:.0f}s", remember=False, idle=True)

    # -- reload and shutdown ---------------------------------------------------------------------

    async def reload(self) -> Detail:
        """Re-read the config: added models start, removed ones stop, changed ones restart on their
        new revision (which also lifts a quarantine). A broken file changes nothing. One reload at
        a time, holding every model it may touch: a second SIGHUP compares against what the first
        left instead of building a second runtime (and worker) for the same model."""
        new = cfg_mod.load(self.config.source)
        async with self.gate.hold(CONFIG_KEY, *self._models, *(m.id for m in new.models)):
            return await self._apply_config(new)

    async def _apply_config(self, new: Config) -> Detail:
        models, services = self._models, self._services
        old_ids, new_ids = set(models), {m.id for m in new.models}
        changed = [m for m in new.models if m.id in old_ids and m.revision != models[m.id].cfg.revision]
        services.configs.replace(new)
        services.store.retention = Retention.of(new)
        sup = new.supervisor
        # The budget follows the config too; models already admitted keep their reservations.
        services.ledger.budget = memory.budget_bytes(sup.memory_budget_bytes, sup.memory_reserve_bytes)
        services.ledger.return_timeout_s = sup.memory_return_timeout_s
        self._reloaded(new)
        for model_id in old_ids - new_ids:
            await models.pop(model_id).stop("removed from config", remember=False)
        for m in changed:
            await models[m.id].stop("config changed", remember=False)
            services.store.set_quarantine(m.id, None)
            models[m.id] = self._runtime(m, services)
            # A changed section is a new attempt: the registry's "failed" was about the old one.
            self.autostart(models[m.id], "config changed", force=True)
        for m in new.models:
            if m.id not in old_ids:
                models[m.id] = self._runtime(m, services)
                self.autostart(models[m.id], "added to config")
        summary = {"added": sorted(new_ids - old_ids), "removed": sorted(old_ids - new_ids),
                   "changed": sorted(m.id for m in changed)}
        self._note("info", "config.reloaded", **summary)
        return summary

    async def stop_all(self, reason: str, timeout_s: float) -> None:
        """Shutdown: refuse new verbs, let those in flight finish (bounded: they start nothing
        more), then stop every model, so the table is the last word on which workers exist.
        remember=False: a shutdown is not an operator's unload; the same models come back next boot."""
        await self.gate.close(timeout_s)
        await asyncio.gather(*(rt.stop(f"supervisor {reason}", remember=False) for rt in self._models.values()))
