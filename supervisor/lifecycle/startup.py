"""One model's way up to its canary: admission, then a worker (a previous run's, adopted; a warm
spare; or a new process) through its handshake and load. What it learns along the way that only
the way up needs lives here: the orphan a previous run left, an operator's force, and doubt about
cached hashes. State changes, the canary and READY are the runtime's."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from protocol import errors as E
from protocol.messages import Init
from supervisor.admission import admit as admission, kvcache, positions
from supervisor.config import ModelConfig
from supervisor.lifecycle.states import ModelState as S
from supervisor.workers.group import RankGroup
from supervisor.workers.handle import AdoptionRefused, wait_for, WorkerHandle

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime


class Startup:
    def __init__(self, rt: "ModelRuntime") -> None:
        self.rt = rt
        # A worker of a previous supervisor run, still inside its orphan grace: adopted on start.
        self.orphan: dict[str, Any] | None = rt.store.worker(rt.cfg.id)
        self.force = False  # an operator's word that a combination the registry knows as bad may be tried
        self.doubt = False  # an operator's release: the next admission trusts no cached hash

    async def admit(self) -> E.LmxError | None:
        """Admission of the revision to run; the refusal, or None."""
        rt, orphan = self.rt, self.orphan
        # A worker of ours still serving this revision is adopted first: no registry verdict takes
        # down a model that is serving (only integrity and memory can refuse it).
        adoptable = orphan is not None and orphan["revision"] == rt.running.revision
        # Cached hashes cannot see bit rot: after a failure (or an operator's release) read it all.
        fresh = self.doubt or bool(rt.store.failures(rt.cfg.id, time.time() - rt.config.restart.window_s))
        self.doubt = False
        refusal = await admission.admit(rt.cfg.id, rt.running, rt.store, rt.services.ledger, rt.services.evict,
                                        self.force or adoptable, rt.config.supervisor.model_roots, fresh)
        if refusal is not None and orphan is not None:
            self.orphan = None  # refused: end it now rather than leave it waiting out its grace
            WorkerHandle.end_orphan(orphan, rt.running, rt.services, f"admission refused: {refusal.code.code}")
        return refusal

    async def run(self) -> WorkerHandle:
        """STARTING -> (LOADING ->) CANARY: the worker that will take the canary."""
        rt, cfg = self.rt, self.rt.running
        orphan, self.orphan = self.orphan, None
        worker = None
        if orphan is not None and orphan["revision"] == cfg.revision:
            rt.to(S.STARTING, f"adopting worker pid {orphan['pid']}")
            worker = await self._adopt(orphan)
        else:
            if orphan is not None:
                WorkerHandle.end_orphan(orphan, cfg, rt.services,
                                        f"its revision {orphan['revision']} is no longer wanted")
            rt.to(S.STARTING, "spawn")
        if worker is not None:
            rt.to(S.CANARY, "adopted: weights already loaded")
            return worker
        if cfg.group is not None:
            return await self._start_group(cfg)
        return await self._spawn_and_load(cfg)

    async def _start_group(self, cfg: ModelConfig) -> RankGroup:
        """Every rank spawned with its place in the group; CANARY once every rank has loaded."""
        rt, sup = self.rt, self.rt.config.supervisor
        group = RankGroup(cfg, rt.services, rt)
        rt.worker = group
        init = self._init(cfg)
        group.spawn(sup, init)
        await group.start(init, sup)
        rt.to(S.LOADING, "handshake done with every rank")
        await group.until_ready(sup)
        rt.to(S.CANARY, "weights loaded on every rank")
        return group

    def _init(self, cfg: ModelConfig) -> Init:
        sup = self.rt.config.supervisor
        context, limit = positions.context_tokens(cfg.path, cfg.context_tokens)
        if limit is not None:
            self.rt.log.warning("model.context_clamped", context_tokens=cfg.context_tokens, position_limit=limit,
                                message=f"context_tokens {cfg.context_tokens} is past the model's position limit "
                                        f"{limit} (config.json): prompts are refused from {limit} tokens")
        return Init(cfg.id, cfg.revision, cfg.path, sup.heartbeat_interval_s, sup.orphan_grace_s,
                    cfg.memory_limit_bytes, cfg.max_batch_size, cfg.prefill_step_size, cfg.stream_interval_s,
                    context_tokens=context, **self._prefix_cache_init(cfg))

    async def _adopt(self, record: dict[str, Any]) -> WorkerHandle | None:
        """The worker proves itself with an adoption hello, or is ended and a fresh one spawned.
        Neither outcome is a model failure: the supervisor, not the model, went away."""
        rt = self.rt
        try:
            worker = rt.worker = WorkerHandle.adopt(record, rt.running, rt.services, rt)
        except AdoptionRefused as exc:
            rt.log.info("worker.adoption_skipped", reason=str(exc), worker_pid=record["pid"])
            return None
        sup = rt.config.supervisor
        worker.watch(sup)
        why = await worker.prove(record, rt.running.revision, max(5.0, 3 * sup.heartbeat_interval_s))
        if why is not None:
            rt.log.warning("worker.adoption_refused", reason=why, worker_pid=record["pid"])
            await rt.stop_worker(f"adoption refused: {why}")
            return None
        rt.log.info("worker.adopted", worker_pid=record["pid"], revision=record["revision"])
        return worker

    def _spawned(self, cfg: ModelConfig) -> WorkerHandle:
        """A warm spare (interpreter up, mlx-lm imported) if the pool has one and the model runs the
        standard worker, else a new process."""
        spares = self.rt.services.spares
        spare = spares.take() if spares is not None and cfg.worker_command is None else None
        if spare is not None:
            spare.assign(cfg, self.rt)
            return spare
        return WorkerHandle.spawn(cfg, self.rt.services, self.rt)

    async def _spawn_and_load(self, cfg: ModelConfig) -> WorkerHandle:
        rt, sup = self.rt, self.rt.config.supervisor
        worker = rt.worker = self._spawned(cfg)
        worker.watch(sup)
        await wait_for(worker.hello, sup.handshake_timeout_s,
                       E.LoadTimeout(f"no hello within handshake_timeout_s={sup.handshake_timeout_s}"))
        worker.tell(self._init(cfg))
        rt.to(S.LOADING, "handshake done")
        await wait_for(worker.ready, sup.load_timeout_s,
                       E.LoadTimeout(f"no ready within load_timeout_s={sup.load_timeout_s}"))
        rt.to(S.CANARY, "weights loaded")
        return worker

    def _prefix_cache_init(self, cfg: ModelConfig) -> dict[str, Any]:
        # The state dir holds the logs: hot prefixes go beside them (none without one: a probe).
        try:
            return kvcache.init_fields(cfg, self.rt.services.state_dir)
        except OSError as exc:  # an unwritable cache dir costs persistence, not the model
            self.rt.log.warning("model.prefix_cache_dir_unusable", error=str(exc))
            return kvcache.init_fields(cfg, None)
