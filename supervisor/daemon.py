"""The supervisor process: state dir and lock, sockets, model runtimes, signals, drain and exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

import supervisor
from protocol import endpoint as ep
from protocol import errors as E
from supervisor import config as cfg_mod, logs
from supervisor.admission import memory, probe
from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config
from supervisor.control.admin import AdminGate, CONFIG_KEY, ModelOps
from supervisor.control.events import EventPublisher
from supervisor.control.metrics import Metrics, serve_http
from supervisor.control.remote import RemoteListener
from supervisor.control.router import Router
from supervisor.control.server import ControlServer
from supervisor.lifecycle import modelstatus
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.lifecycle.states import ModelState
from supervisor.services import Services
from supervisor.workers.hub import WorkerHub
from supervisor.workers.placed import PlacedRanks
from supervisor.workers.spares import SparePool
# Re-exported: the CLI and tests take the state dir's set-up from here.
from supervisor.persistence.statedir import LOCK_FILE, StateDirError, prepare_state_dir  # noqa: F401
from supervisor.persistence.store import Retention, Store

EXIT_SOFTWARE = 70  # EX_SOFTWARE: an internal failure; the service manager restarts us
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL: the store is locked (or read-only, full): try again later


class Supervisor:
    def __init__(self, config: Config, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started = time.monotonic()
        self._proc = psutil.Process()
        self._rss = (0.0, 0)  # (monotonic time read, bytes): status reads /proc at most once a second
        self.log = logs.get()
        self._stop = asyncio.Event()
        self._signal: str | None = None
        self.store = Store(state_dir, config.supervisor.store_lock_wait_s, Retention.of(config))
        self.boot_id = self.store.boot()
        sup = config.supervisor
        unclean = self.store.unclean_boots_since(time.time() - sup.crash_loop_window_s)
        # Started this often without a clean shutdown: something at start kills us. Serve status
        # and admin ops, but start no model by ourselves until an operator loads one.
        self.safe_mode = unclean + 1 >= sup.crash_loop_starts
        self.ctx = zmq.asyncio.Context()
        self.metrics = Metrics()
        self.store.db.on_write = self.metrics.store_write.observe
        # PUB never blocks, so a plain (sync) socket on the same context is safe from the loop.
        self.events = EventPublisher(zmq.Context.shadow(self.ctx.underlying), ep.events_endpoint(state_dir),
                                     state_dir / ep.EVENTS_SOCKET, self.metrics.events)
        self.ledger = MemoryLedger(memory.budget_bytes(sup.memory_budget_bytes, sup.memory_reserve_bytes),
                                   sup.memory_return_timeout_s, self.log, self.events)
        self.hub = WorkerHub(self.ctx, ep.worker_endpoint(state_dir), state_dir / ep.WORKER_SOCKET)
        # What every runtime and control server shares, handed over once (a reload replaces
        # services.config); the spare pool, made from them, is one of them.
        self.services = Services(config, self.store, self.hub, ep.worker_endpoint(state_dir), state_dir / "logs",
                                 self.ledger, self.events, self.metrics, evict=self._evict_for)
        self.spares = self.services.spares = SparePool(sup.warm_spares, self.services) if sup.warm_spares > 0 else None
        self.services.placed = PlacedRanks(self.services) if sup.listen else None  # ranks for peers' groups
        self.models = {m.id: ModelRuntime(m, self.services) for m in config.models}
        self.gate = AdminGate()
        self._draining = asyncio.Event()  # set once, when shutdown begins
        self.ops = ModelOps(self.gate, self.models)
        self.router = Router(self.services, self.models)  # one for both control endpoints
        self._restore_aliases()
        self.control = ControlServer(self.ctx, ep.control_endpoint(state_dir), state_dir / ep.CONTROL_SOCKET, self,
                                     self.router, self.services)
        # Optional tcp endpoint: CURVE clients of the [[clients]] allow-list, each with its role.
        self.remote = RemoteListener(config, self._remote_server) if config.supervisor.listen else None
        self.metrics.watch_status(self.status, lambda: self.control.connections)
        self._metrics_server: asyncio.AbstractServer | None = None
        self._exit_code = 0

    @property
    def config(self) -> Config:
        return self.services.config  # the one current config: a reload replaces it there

    def _remote_server(self, ctx: zmq.asyncio.Context, endpoint: str, configure: Any, access: Any) -> ControlServer:
        return ControlServer(ctx, endpoint, None, self, self.router, self.services, configure=configure, access=access)

    def _note(self, level: str, event: str, **fields: Any) -> None:
        """Log a supervisor-level event and publish it on the events socket."""
        getattr(self.log, level)(event, **fields)
        self.events.publish(event, **fields)

    async def _evict_for(self, model_id: str, need: int) -> bool:
        """evict = "lru": unload least recently used idle READY models until `need` fits."""
        if self.config.supervisor.evict != "lru":
            return False
        idle = sorted((rt for rt in self.models.values()
                       if rt.cfg.id != model_id and rt.state is ModelState.READY and not len(rt.requests)
                       and not rt.cfg.pinned),
                      key=lambda rt: rt.last_used)
        for rt in idle:
            if self.ledger.others(model_id) + need <= self.ledger.budget:
                break
            self._note("warning", "model.evicted", model=rt.cfg.id, for_model=model_id, need_bytes=need,
                       budget_bytes=self.ledger.budget)
            await rt.stop(f"evicted (lru) to make room for {model_id}", remember=False)
        return self.ledger.others(model_id) + need <= self.ledger.budget

    async def _unload_idle(self) -> None:
        """idle_ttl_s: a READY model nobody used for that long is unloaded (pinned ones never); the
        next request for it loads it again."""
        while True:
            await asyncio.sleep(1.0)
            for model_id in list(self.models):
                if not self.gate.busy(model_id):  # an operator's operation on it comes first
                    async with self.gate.hold(model_id):
                        await self._unload_if_idle(self.models.get(model_id))

    async def _unload_if_idle(self, rt: ModelRuntime | None) -> None:
        now = time.monotonic()
        if rt is None:
            return
        ttl = rt.cfg.idle_ttl_s
        if (ttl <= 0 or rt.cfg.pinned or rt.state is not ModelState.READY or len(rt.requests)
                or now - max(rt.last_used, rt.ready_since or now) < ttl):
            return
        self._note("info", "model.idle_unloaded", model=rt.cfg.id, idle_ttl_s=ttl)
        await rt.stop(f"idle for {ttl:.0f}s", remember=False)
        rt.idled_out = True

    async def swap(self, old_id: str, new_id: str) -> dict[str, Any]:
        """`_swap` under both models' locks (by their ids, as aliases resolve)."""
        ids = [self.router.aliases.get(m, m) for m in (old_id, new_id)]
        async with self.gate.hold(*ids):
            return await self._swap(old_id, new_id)

    async def _swap(self, old_id: str, new_id: str) -> dict[str, Any]:
        """NEW takes over OLD's requests. When memory allows, NEW reaches READY first and requests
        move over in one step (no moment where neither serves); else OLD is drained first. A NEW
        that fails to come up leaves OLD as it was."""
        old, new = self.models.get(old_id), self.models.get(new_id)
        for model_id, rt in ((old_id, old), (new_id, new)):
            if rt is None:
                raise E.UnknownModel(f"model {model_id!r} is not declared", model=model_id)
        assert old is not None and new is not None
        if old is new:
            raise E.BadRequest("swap needs two different models")
        need = memory.estimate(new.running.path, new.running.context_tokens)["total"]
        fits = new.state is ModelState.READY or self.ledger.others(new_id) + need <= self.ledger.budget
        mode = "new first" if fits else "old drained first"
        self._note("info", "model.swap_started", model=old_id, new_model=new_id, mode=mode)
        if fits:
            await self._bring_to_ready(new, f"swap for {old_id}")
            self._alias(old_id, new_id)  # one step: the next request for OLD goes to NEW
            await old.stop(f"swapped for {new_id}")
        else:
            await old.stop(f"swapped for {new_id}")
            self._alias(old_id, new_id)
            await self._bring_to_ready(new, f"swap for {old_id}")
        self._note("info", "model.swapped", model=old_id, new_model=new_id, mode=mode)
        return {"mode": mode, "old": old_id, "new": new_id, "state": new.state.value}

    def _alias(self, old_id: str, new_id: str) -> None:
        """Written before it takes effect: a swap outlives a restart of the supervisor."""
        self.store.set_alias(old_id, new_id)
        self.router.aliases[old_id] = new_id

    def _restore_aliases(self) -> None:
        for old_id, new_id in self.store.aliases().items():
            if new_id not in self.models:  # the model that took over is no longer declared
                self.log.warning("model.alias_dropped", model=old_id, new_model=new_id,
                                 reason=f"{new_id} is not in the config")
                self.store.set_alias(old_id, None)
                continue
            self.router.aliases[old_id] = new_id
            self.log.info("model.alias_restored", model=old_id, new_model=new_id)

    async def _bring_to_ready(self, rt: ModelRuntime, reason: str) -> None:
        if rt.state is ModelState.READY:
            return
        rt.start(reason, wanted=True)
        await self._settled(rt)
        if rt.state is not ModelState.READY:
            raise rt.last_error or E.ModelNotReady(f"model {rt.cfg.id} did not become READY ({rt.state.value})")

    async def _settled(self, rt: ModelRuntime) -> None:
        """Until the model is READY or has given up (REJECTED, QUARANTINED, UNLOADED), bounded by
        its load and canary timeouts; a drain cuts it short (the operation then stops what it began)."""
        settled = (ModelState.READY, ModelState.REJECTED, ModelState.QUARANTINED, ModelState.UNLOADED)
        timeout_s = rt.config.supervisor.load_timeout_s + rt.cfg.canary.timeout_s + 60
        waits = (asyncio.ensure_future(rt.until(lambda: rt.state in settled)),
                 asyncio.ensure_future(self._draining.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _autostart(self, rt: ModelRuntime, reason: str, force: bool = False) -> None:
        if self.gate.draining:  # nothing starts while the supervisor drains
            return
        wanted = rt.wanted()
        if wanted or (wanted is None and rt.cfg.autoload):
            rt.start(reason, force=force)

    def _rss_bytes(self) -> int:
        now = time.monotonic()
        if now - self._rss[0] >= 1.0:
            self._rss = (now, self._proc.memory_info().rss)
        return self._rss[1]

    def status(self) -> dict[str, Any]:
        return {
            "supervisor": {
                "pid": os.getpid(),
                "version": supervisor.__version__,
                "rss_bytes": self._rss_bytes(),
                "uptime_s": round(time.monotonic() - self.started, 3),
                # The point of the process split: mlx lives only in workers.
                "mlx_imported": "mlx" in sys.modules or "mlx_lm" in sys.modules,  # any submodule imports these
                "state_dir": str(self.state_dir),
                "config": self.config.source,
                "draining": self.router.draining,
                "safe_mode": self.safe_mode,
                **self.store.health(),
                "memory_budget_bytes": self.ledger.budget,
                "memory_reserved_bytes": sum(self.ledger.held.values()),
                "memory_stranded_bytes": self.ledger.stranded_bytes(),
                "memory_stranded": list(self.ledger.stranded.values()),
                "warm_spares": {"configured": self.spares.size, "ready": self.spares.ready} if self.spares else None,
            },
            "models": [modelstatus.of(rt) for rt in self.models.values()],
        }

    def _on_signal(self, signame: str) -> None:
        self.log.info("supervisor.signal", signal=signame)
        self._signal = signame
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))
        self.hub.start()
        self.control.start()
        if self.remote is not None:
            self.remote.start()
        # A dead receive loop leaves a supervisor that is up but deaf: exit non-zero instead, so
        # launchd/systemd restart it (a clean 0 would be taken as a deliberate stop).
        remote = (self.remote.server.task, self.remote.task) if self.remote is not None else ()
        for task in (self.hub.task, self.control.task, *remote):
            if task is None:
                continue
            task.add_done_callback(self._fatal_if_failed)
        if self.config.supervisor.metrics_port:
            self._metrics_server = await serve_http(self.metrics, self.config.supervisor.metrics_port, self.log)
        pruned = logs.prune_worker_logs(self.state_dir / "logs")
        if pruned:
            self.log.info("logs.pruned", files=len(pruned), kept_per_model=logs.WORKER_LOGS_KEPT)
        self._note("info", "supervisor.started", pid=os.getpid(), version=supervisor.__version__,
                   state_dir=str(self.state_dir), models=list(self.models), safe_mode=self.safe_mode)
        if self.safe_mode:
            self._note("error", "supervisor.safe_mode", reason="crash loop: too many starts without a clean "
                       "shutdown", starts=self.config.supervisor.crash_loop_starts,
                       window_s=self.config.supervisor.crash_loop_window_s)
        else:
            for rt in self.models.values():
                self._autostart(rt, "autoload")
        if self.spares is not None:
            self.spares.fill()
        idle = loop.create_task(self._unload_idle(), name="idle-ttl")
        await self._stop.wait()
        idle.cancel()
        await self.shutdown(self._signal or "stop")
        return self._exit_code

    def _fatal_if_failed(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        self.log.critical("supervisor.fatal", task=task.get_name(), error=repr(exc),
                          exc_info=(type(exc), exc, exc.__traceback__) if exc else None)
        self._exit_code = EXIT_SOFTWARE
        self._signal = f"fatal: {task.get_name()} stopped"
        self._stop.set()

    async def probe(self, path: str) -> dict[str, Any]:
        return await probe.probe(self, path, self._settled)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except cfg_mod.ConfigError as exc:
            self.log.error("config.reload_refused", file=exc.file, key=exc.key, problem=exc.problem)
        except E.ShuttingDown as exc:
            self.log.warning("admin.refused", op="reload", code=exc.code.code, reason=exc.message)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config: added models start, removed ones stop, changed ones restart on their
        new revision (which also lifts a quarantine). A broken file changes nothing. One reload at
        a time, holding every model it may touch: a second SIGHUP compares against what the first
        left instead of building a second runtime (and worker) for the same model."""
        new = cfg_mod.load(self.config.source)
        async with self.gate.hold(CONFIG_KEY, *self.models, *(m.id for m in new.models)):
            return await self._apply_config(new)

    async def _apply_config(self, new: Config) -> dict[str, Any]:
        old_ids, new_ids = set(self.models), {m.id for m in new.models}
        changed = [m for m in new.models if m.id in old_ids and m.revision != self.models[m.id].cfg.revision]
        self.services.config = new
        self.store.retention = Retention.of(new)
        sup = new.supervisor
        # The budget follows the config too; models already admitted keep their reservations.
        self.ledger.budget = memory.budget_bytes(sup.memory_budget_bytes, sup.memory_reserve_bytes)
        self.ledger.return_timeout_s = sup.memory_return_timeout_s
        if self.remote is not None:
            self.remote.update(new)
        for model_id in old_ids - new_ids:
            await self.models.pop(model_id).stop("removed from config", remember=False)
        for m in changed:
            rt = self.models[m.id]
            await rt.stop("config changed", remember=False)
            self.store.set_quarantine(m.id, None)
            self.models[m.id] = ModelRuntime(m, self.services)
            # A changed section is a new attempt: the registry's "failed" was about the old one.
            self._autostart(self.models[m.id], "config changed", force=True)
        for m in new.models:
            if m.id not in old_ids:
                self.models[m.id] = ModelRuntime(m, self.services)
                self._autostart(self.models[m.id], "added to config")
        summary = {"added": sorted(new_ids - old_ids), "removed": sorted(old_ids - new_ids),
                   "changed": sorted(m.id for m in changed)}
        self._note("info", "config.reloaded", **summary)
        return summary

    async def shutdown(self, reason: str) -> None:
        """Stop taking work, let in-flight generations finish (drain_grace_s), stop every worker."""
        self._draining.set()  # before the gate closes: an operation waiting in _settled ends now
        self.router.draining = True  # both endpoints refuse new work from here on
        sup = self.config.supervisor
        self._note("info", "supervisor.draining", reason=reason, drain_grace_s=sup.drain_grace_s)
        # Operations in flight finish first (they start nothing more), so the table below is the
        # last word on which runtimes, and workers, exist.
        await self.gate.close(sup.drain_grace_s + 3 * sup.stop_timeout_s + 5.0)
        # remember=False: a shutdown is not an operator's unload; the same models come back next boot.
        await asyncio.gather(*(rt.stop(f"supervisor {reason}", remember=False) for rt in self.models.values()))
        if self.spares is not None:
            await self.spares.close(self.config.supervisor.stop_timeout_s)
        if self.services.placed is not None:
            self.services.placed.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self._note("info", "supervisor.stopping", reason=reason)
        self.control.close()
        if self.remote is not None:
            self.remote.close()
        self.hub.close()
        self.events.close()
        self.ctx.term()
        self.store.clean_shutdown(self.boot_id)
        self.store.close()
        self.log.info("supervisor.stopped", reason=reason)
