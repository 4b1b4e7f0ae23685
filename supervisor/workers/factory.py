"""Where a model's workers come from: the `WorkerFactory` protocol (spawn, take a spare, place a
group, adopt a previous run's worker, end an orphan) and `LocalFactory`, the real one, made from the
host's parts (hub, endpoint, config) and the spare pool. A lifecycle that holds a factory, not these
classes, can be run in-process on a fake one (tests/fakeworker.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from protocol.messages import Init
from supervisor import logs
from supervisor.admission import kvcache, positions
from supervisor.config import ModelConfig
from supervisor.persistence.records import WorkerRecord
from supervisor.workers.group import RankGroup
from supervisor.workers.handle import AdoptionRefused, WorkerHandle
from supervisor.workers.spares import SparePool
from supervisor.workers.worker import Host, Owner, Worker

__all__ = ["LocalFactory", "WorkerFactory"]


class WorkerFactory(Protocol):
    """Hands a model's owner its workers. Each worker comes watched (heartbeats, stalls, memory) and
    reports to `owner`; bringing it up is the worker's own `greet(init)` then `load()`."""

    def init(self, cfg: ModelConfig) -> Init:
        """The Init that makes a worker `cfg`'s (its context clamped to the model's positions)."""

    def spawn(self, cfg: ModelConfig, owner: Owner) -> Worker:
        """A warm spare, if the pool has one and `cfg` runs the standard worker; else a new process."""

    def place_group(self, cfg: ModelConfig, owner: Owner, init: Init) -> Worker:
        """`cfg.group`'s ranks, every one spawned here or placed on its peer, as one worker."""

    def adopt(self, record: WorkerRecord, cfg: ModelConfig, owner: Owner) -> Worker | None:
        """A previous run's worker whose pid and start time match `record` (None if they do not); it
        has yet to prove itself (`prove`)."""

    async def prove(self, worker: Worker, record: WorkerRecord, revision: str) -> str | None:
        """None once the adopted worker proved it is `record`'s, on `revision` (it is ours again);
        else why not (the caller then stops it)."""

    def end_orphan(self, record: WorkerRecord, cfg: ModelConfig, why: str) -> None:
        """A previous run's worker nobody will adopt: ended, if pid and start time still match."""


class LocalFactory:
    """The real factory: workers on this host's hub, groups across its peers."""

    def __init__(self, host: Host, spares: SparePool | None = None) -> None:
        self._host = host
        self._spares = spares

    def init(self, cfg: ModelConfig) -> Init:
        sup = self._host.config.supervisor
        context, limit = positions.context_tokens(cfg.path, cfg.context_tokens)
        if limit is not None:
            log = logs.get(model=cfg.id)
            log.warning(
                "model.context_clamped", context_tokens=cfg.context_tokens, position_limit=limit,
                message=f"context_tokens {cfg.context_tokens} is past the model's position limit "
                        f"{limit} (config.json): prompts are refused from {limit} tokens")
        return Init(cfg.id, cfg.revision, cfg.path, sup.heartbeat_interval_s, sup.orphan_grace_s,
                    cfg.memory_limit_bytes, cfg.max_batch_size, cfg.prefill_step_size, cfg.stream_interval_s,
                    context_tokens=context, kind=cfg.kind, **self._prefix_cache_init(cfg))

    def _prefix_cache_init(self, cfg: ModelConfig) -> dict[str, Any]:
        # The state dir holds the logs: hot prefixes go beside them (none without one: a probe).
        try:
            return kvcache.init_fields(cfg, self._host.state_dir)
        except OSError as exc:  # an unwritable cache dir costs persistence, not the model
            log = logs.get(model=cfg.id)
            log.warning("model.prefix_cache_dir_unusable", error=str(exc))
            return kvcache.init_fields(cfg, None)

    def spawn(self, cfg: ModelConfig, owner: Owner) -> WorkerHandle:
        spare = self._spares.take() if self._spares is not None and cfg.worker_command is None else None
        if spare is not None:
            spare.assign(cfg, owner)
            worker = spare
        else:
            worker = WorkerHandle.spawn(cfg, self._host, owner)
        worker.watch(self._host.config.supervisor)
        return worker

    def place_group(self, cfg: ModelConfig, owner: Owner, init: Init) -> RankGroup:
        group = RankGroup(cfg, self._host, owner)
        try:
            group.spawn(self._host.config.supervisor, init)
        except BaseException:  # the ranks spawned before the one that failed are not left running
            asyncio.get_running_loop().create_task(group.close("its group failed to spawn", 0.0))
            raise
        return group

    def adopt(self, record: WorkerRecord, cfg: ModelConfig, owner: Owner) -> WorkerHandle | None:
        try:
            worker = WorkerHandle.adopt(record, cfg, self._host, owner)
        except AdoptionRefused as exc:
            log = logs.get(model=cfg.id)
            log.info("worker.adoption_skipped", reason=str(exc), worker_pid=record.pid)
            return None
        worker.watch(self._host.config.supervisor)
        return worker

    async def prove(self, worker: Worker, record: WorkerRecord, revision: str) -> str | None:
        assert isinstance(worker, WorkerHandle)  # only a single worker is ever adopted
        log = logs.get(model=worker.cfg.id)
        why = await worker.prove(record, revision, max(5.0, 3 * self._host.config.supervisor.heartbeat_interval_s))
        if why is not None:
            log.warning("worker.adoption_refused", reason=why, worker_pid=record.pid)
        else:
            log.info("worker.adopted", worker_pid=record.pid, revision=record.revision)
        return why

    def end_orphan(self, record: WorkerRecord, cfg: ModelConfig, why: str) -> None:
        WorkerHandle.end_orphan(record, cfg, self._host, why)
