"""The supervisor process, its composition root: the state dir's store, the sockets, the parts built
once and handed to each other, the signals, the boot and the shutdown order. What a verb does is
supervisor.operations'; what a message gets, supervisor.control's."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

import supervisor
from protocol import endpoint as ep
from protocol import errors as E
from supervisor import config as cfg_mod, logs
from supervisor.admission import memory
from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config
from supervisor.control.events import EventPublisher
from supervisor.control.metrics import Metrics, serve_http
from supervisor.control.remote import RemoteListener
from supervisor.control.router import Router
from supervisor.control.server import ControlServer
from supervisor.operations.status import ProcessFigures
from supervisor.operations.verbs import Operations
from supervisor.services import ConfigRef, Services, WorkerHost
from supervisor.workers.hub import WorkerHub
from supervisor.workers.placed import PlacedRanks
from supervisor.workers.spares import SparePool
from supervisor.persistence.store import Retention, Store

EXIT_SOFTWARE = 70  # EX_SOFTWARE: an internal failure; the service manager restarts us
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL: the store is locked (or read-only, full): try again later


class Supervisor:
    def __init__(self, config: Config, state_dir: Path) -> None:
        self.state_dir = state_dir
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
        # Built from finished parts, in order, and frozen: what workers need first, the spares and
        # the ranks for peers made from it, then the services from all of them. Eviction is one of
        # the operations built from the services, so it is reached late, through self.ops.
        host = WorkerHost(ConfigRef(config), self.store, self.hub, ep.worker_endpoint(state_dir), state_dir / "logs",
                          self.ledger)
        self.spares = SparePool(sup.warm_spares, host) if sup.warm_spares > 0 else None
        self.services = Services.of(host, events=self.events, metrics=self.metrics, spares=self.spares,
                                    evict=lambda model_id, need: self.ops.evict_for(model_id, need),
                                    placed=PlacedRanks(host) if sup.listen else None)  # ranks for peers' groups
        # The model table, its aliases, the admin gate and the one drain flag: every verb's home.
        self.ops = Operations(self.services, ProcessFigures(state_dir, self.safe_mode), reloaded=self._reloaded)
        self.router = Router(self.ops)  # one for both control endpoints
        self.control = ControlServer(self.ctx, ep.control_endpoint(state_dir), state_dir / ep.CONTROL_SOCKET,
                                     self.ops, self.router, self.services)
        # Optional tcp endpoint: CURVE clients of the [[clients]] allow-list, each with its role.
        self.remote = RemoteListener(config, self._remote_server) if config.supervisor.listen else None
        self.metrics.watch_status(self.ops.status, lambda: self.control.connections)
        self._metrics_server: asyncio.AbstractServer | None = None
        self._exit_code = 0

    @property
    def config(self) -> Config:
        return self.services.config  # the one current config: a reload replaces it there

    def _remote_server(self, ctx: zmq.asyncio.Context, endpoint: str, configure: Any, access: Any) -> ControlServer:
        return ControlServer(ctx, endpoint, None, self.ops, self.router, self.services, configure=configure,
                             access=access)

    def _reloaded(self, new: Config) -> None:
        """A reload's new config reaches the tcp endpoint's allow-list too."""
        if self.remote is not None:
            self.remote.update(new)

    def _note(self, level: str, event: str, **fields: Any) -> None:
        """Log a supervisor-level event and publish it on the events socket."""
        getattr(self.log, level)(event, **fields)
        self.events.publish(event, **fields)

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
        await self._boot()
        idle = loop.create_task(self.ops.unload_idle(), name="idle-ttl")
        await self._stop.wait()
        idle.cancel()
        await self.shutdown(self._signal or "stop")
        return self._exit_code

    async def _boot(self) -> None:
        """Old worker logs pruned, the start announced, then the models the config (or the
        operator's last word) wants, unless a crash loop put us in safe mode, and the spares."""
        pruned = logs.prune_worker_logs(self.state_dir / "logs")
        if pruned:
            self.log.info("logs.pruned", files=len(pruned), kept_per_model=logs.WORKER_LOGS_KEPT)
        self._note("info", "supervisor.started", pid=os.getpid(), version=supervisor.__version__,
                   state_dir=str(self.state_dir), models=list(self.ops.models), safe_mode=self.safe_mode)
        if self.safe_mode:
            self._note("error", "supervisor.safe_mode", reason="crash loop: too many starts without a clean "
                       "shutdown", starts=self.config.supervisor.crash_loop_starts,
                       window_s=self.config.supervisor.crash_loop_window_s)
        else:
            self.ops.autostart_all("autoload")
        if self.spares is not None:
            self.spares.fill()

    def _fatal_if_failed(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        self.log.critical("supervisor.fatal", task=task.get_name(), error=repr(exc),
                          exc_info=(type(exc), exc, exc.__traceback__) if exc else None)
        self._exit_code = EXIT_SOFTWARE
        self._signal = f"fatal: {task.get_name()} stopped"
        self._stop.set()

    async def _reload_logged(self) -> None:
        """SIGHUP: a reload whose refusal is logged (there is no client to answer)."""
        try:
            await self.ops.reload()
        except cfg_mod.ConfigError as exc:
            self.log.error("config.reload_refused", file=exc.file, key=exc.key, problem=exc.problem)
        except E.ShuttingDown as exc:
            self.log.warning("admin.refused", op="reload", code=exc.code.code, reason=exc.message)

    async def shutdown(self, reason: str) -> None:
        """Stop taking work, let in-flight generations finish (drain_grace_s), stop every worker."""
        # The one drain flag: both endpoints refuse new work, no verb begins, and one waiting for
        # a model to settle ends now.
        self.ops.drain()
        sup = self.config.supervisor
        self._note("info", "supervisor.draining", reason=reason, drain_grace_s=sup.drain_grace_s)
        # Operations in flight finish first (they start nothing more), so the table is the last
        # word on which runtimes, and workers, exist when every model stops.
        await self.ops.stop_all(reason, sup.drain_grace_s + 3 * sup.stop_timeout_s + 5.0)
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
