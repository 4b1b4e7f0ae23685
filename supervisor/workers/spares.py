"""Warm spares: worker processes started ahead of need, with the interpreter up and mlx-lm imported,
waiting for a model. A model that starts (or restarts after a crash) takes one and pays only its
load and canary. Spares are plain workers: they run no model code until assigned, and the pool
refills itself after every take."""

from __future__ import annotations

import asyncio
import time

from protocol.messages import Message
from supervisor import logs
from supervisor.config import ModelConfig
from supervisor.workers.handle import WorkerHandle
from supervisor.workers.worker import Host

SPARE_ID = "spare"
# A spare that dies this soon after its start is not replaced at once (no spawn loop).
REFILL_BACKOFF_S = 5.0


class SparePool:
    """Owns the spares (their handles' Owner until a model takes one)."""

    def __init__(self, size: int, host: Host) -> None:
        self.size = size
        self._host = host
        self._spares: dict[str, WorkerHandle] = {}
        self._closed = False
        self._refill: asyncio.TimerHandle | None = None
        self.log = logs.get(model=SPARE_ID)

    def fill(self) -> None:
        self._refill = None
        while not self._closed and len(self._spares) < self.size:
            handle = WorkerHandle.spawn(ModelConfig(id=SPARE_ID, path=""), self._host, self, spare=True)
            self._spares[handle.process.token] = handle

    def take(self) -> WorkerHandle | None:
        """A spare that has said hello (imports done), or None: then the caller spawns a worker.
        The caller assigns it a model (WorkerHandle.assign)."""
        for token, spare in self._spares.items():
            if spare.greeting is not None and spare.process.alive:
                del self._spares[token]
                self.log.info("worker.spare_taken", worker_pid=spare.process.pid)
                if not self._closed and self._refill is None:
                    self._refill = asyncio.get_running_loop().call_soon(self.fill)
                return spare
        return None

    def on_worker_result(self, handle: WorkerHandle, msg: Message) -> None:
        pass  # a spare has no requests: only its hello and heartbeats, which its handle takes

    def on_worker_exit(self, handle: WorkerHandle, rc: int | None) -> None:
        if self._spares.pop(handle.process.token, None) is None or self._closed:
            return
        asyncio.get_running_loop().create_task(handle.close("spare died", 0.0))  # off the hub
        self.log.warning("worker.spare_died", worker_pid=handle.process.pid, exit_code=rc)
        if self._refill is None:
            lived_s = time.time() - (handle.process.start_time or 0.0)  # the process's own start (wall clock)
            delay = REFILL_BACKOFF_S if lived_s < REFILL_BACKOFF_S else 0.0
            self._refill = asyncio.get_running_loop().call_later(delay, self.fill)

    @property
    def ready(self) -> int:
        return sum(1 for s in self._spares.values() if s.greeting is not None)

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
        spares = list(self._spares.values())
        self._spares.clear()
        await asyncio.gather(*(s.close("supervisor stopping", timeout_s) for s in spares))
