"""The way up's IO, one step per call, each returning the event it came to (lifecycle.events) for the
runtime to reduce: admission, a worker (a previous run's, adopted; a warm spare; a new process; a
group's ranks) from the WorkerFactory, its handshake, its load, its canary. It changes no state and
holds no runtime: what it keeps is what only the way up needs, the orphan a previous run left."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from protocol import errors as E
from protocol.messages import Init
from supervisor import logs
from supervisor.admission import admit as admission
from supervisor.admission.evidence import Evidence
from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config, ModelConfig
from supervisor.lifecycle.canary import run_canary
from supervisor.lifecycle.events import (
    AdmissionPassed, Adopted, AdoptionFailed, CanaryPassed, Event, HelloReceived, Loaded, Refused, Spawned,
    StartFailed)
from supervisor.lifecycle.requests import RequestQueue
from supervisor.persistence.records import WorkerRecord
from supervisor.persistence.store import Store
from supervisor.workers.factory import WorkerFactory
from supervisor.workers.worker import Owner, Worker

Evict = Callable[[str, int], Awaitable[bool]] | None


class Startup:
    def __init__(self, model_id: str, store: Store, ledger: MemoryLedger, evict: Evict,
                 config: Callable[[], Config], factory: WorkerFactory) -> None:
        self.model_id = model_id
        self._store, self._ledger, self._evict, self._config = store, ledger, evict, config
        self._factory = factory
        self.log = logs.get(model=model_id)
        # A worker of a previous supervisor run, still inside its orphan grace: adopted on start.
        self.orphan: WorkerRecord | None = store.worker_record(model_id)

    async def admit(self, cfg: ModelConfig, force: bool, doubt: bool) -> AdmissionPassed | Refused:
        """Admission of `cfg` (the revision to run). `doubt`: read every file, whatever the cache says."""
        orphan, config = self.orphan, self._config()
        # A worker of ours still serving this revision is adopted first: no registry verdict takes
        # down a model that is serving (only integrity and memory can refuse it).
        adoptable = orphan is not None and orphan.revision == cfg.revision
        # Cached hashes cannot see bit rot: after a failure (or an operator's release) read it all.
        fresh = doubt or bool(self._store.failures(self.model_id, time.time() - config.restart.window_s))
        refusal = await admission.admit(self.model_id, cfg, self._store, self._ledger, self._evict,
                                        force or adoptable, config.supervisor.model_roots, fresh)
        if refusal is not None:
            if orphan is not None:  # refused: end it now rather than leave it waiting out its grace
                self.orphan = None
                self._factory.end_orphan(orphan, cfg, f"admission refused: {refusal.code.code}")
            return Refused(refusal)
        return self.passed()

    async def settle(self) -> AdmissionPassed:
        """A restart keeps its reservation, but a dead worker's memory must be back first."""
        await self._ledger.settle()
        return self.passed()

    def passed(self) -> AdmissionPassed:
        """The way on from an admission: the orphan, if any, goes with it (adopted, or ended)."""
        orphan, self.orphan = self.orphan, None
        return AdmissionPassed(orphan)

    def end_orphan(self, record: WorkerRecord, cfg: ModelConfig, why: str) -> None:
        self._factory.end_orphan(record, cfg, why)

    async def adopt(self, record: WorkerRecord, cfg: ModelConfig, owner: Owner) -> Event:
        """The worker proves itself with an adoption hello, or is ended (then a fresh one is spawned)."""
        return await self._step(None, self._adopt(record, cfg, owner), None)

    async def _adopt(self, record: WorkerRecord, cfg: ModelConfig, owner: Owner) -> Adopted | AdoptionFailed:
        worker = self._factory.adopt(record, cfg, owner)
        if worker is None:
            return AdoptionFailed("not the recorded process")
        why = await self._factory.prove(worker, record, cfg.revision)
        if why is not None:
            await worker.close(f"adoption refused: {why}", self._config().supervisor.stop_timeout_s)
            return AdoptionFailed(why)
        return Adopted(worker)

    def spawn(self, cfg: ModelConfig, owner: Owner) -> Spawned | StartFailed:
        """A worker: a group's ranks placed with their Init, else a warm spare or a new process."""
        try:
            init = self._factory.init(cfg)
            if cfg.group is not None:
                return Spawned(self._factory.place_group(cfg, owner, init), init)
            return Spawned(self._factory.spawn(cfg, owner), init)
        except E.LmxError as exc:
            return StartFailed(exc, None)
        except Exception as exc:
            self.log.exception("internal.start_failed")
            return StartFailed(E.InternalError(f"start failed: {exc!r}"), None)

    async def greet(self, worker: Worker, init: Init) -> Event:
        return await self._step(worker, worker.greet(init, self._config().supervisor), HelloReceived())

    async def load(self, worker: Worker) -> Event:
        return await self._step(worker, worker.load(self._config().supervisor), Loaded())

    async def canary(self, worker: Worker, cfg: ModelConfig, requests: RequestQueue) -> Event:
        """The canary, on the queue clients' requests will take (only its request is on it), then
        the registry's word on its output (the same stack giving other greedy text fails it)."""
        return await self._step(worker, self._canary(worker, cfg, requests), None)

    async def _canary(self, worker: Worker, cfg: ModelConfig, requests: RequestQueue) -> CanaryPassed:
        result = await run_canary(cfg.canary, requests, self.log, cfg)
        load_s = worker.loaded.load_s if worker.loaded else None
        evidence = Evidence(self._store, self.model_id, cfg.path, cfg.worker_command, cfg.group)
        return CanaryPassed(result, evidence.canary_passed(cfg.canary, result, load_s, worker.memory))

    async def _step(self, worker: Worker | None, step: Awaitable[Any], done: Event | None) -> Event:
        """`done` once `step` is over (or what `step` returned), else what failed it (a death
        during it surfaces as the error of what it awaited)."""
        try:
            out = await step
        except E.LmxError as exc:
            return StartFailed(exc, worker, worker.death if worker else None)
        except Exception as exc:  # asyncio.CancelledError is no Exception: a stop's cancel goes through
            self.log.exception("internal.start_failed")
            return StartFailed(E.InternalError(f"start failed: {exc!r}"), worker, worker.death if worker else None)
        return out if done is None else done
