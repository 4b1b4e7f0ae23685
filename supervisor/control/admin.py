"""Admin operations, one at a time per model: reload, load, unload, swap, rollback, release, repair,
probe and the idle unloader hold the locks of the models they touch across all their awaits, and
none begins once the supervisor drains."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator

from protocol import errors as E
from supervisor.admission import modelrepair

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime

# Reloads hold this besides their models' locks: two reloads never interleave, even when they
# touch no model in common (the second must compare against what the first left).
CONFIG_KEY = "\x00config"


class AdminGate:
    """Named asyncio locks, taken in sorted order (two operations on overlapping models cannot
    deadlock), plus the drain switch. An operation's awaits (a drain, a stop ladder) used to let a
    second one in on the same model: two reloads 50 ms apart each built a runtime for it, and the
    one overwritten in the table kept a worker nobody tracked."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        self._refuse_if_draining()
        self._active += 1
        self._idle.clear()
        taken: list[asyncio.Lock] = []
        try:
            for key in sorted(set(keys)):
                lock = self._locks.setdefault(key, asyncio.Lock())
                await lock.acquire()
                taken.append(lock)
            self._refuse_if_draining()  # it waited behind another operation while a drain began
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            self._active -= 1
            if not self._active:
                self._idle.set()

    def busy(self, key: str) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise E.ShuttingDown("supervisor is shutting down", retry_after_s=5.0)

    async def close(self, timeout_s: float) -> bool:
        """Refuse new operations, then wait (bounded) for those in flight; True when none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


class ModelOps:
    """The operator's per-model operations, each under its model's lock and on the runtime that is
    current once the lock is held (a reload may have replaced it while this one waited)."""

    def __init__(self, gate: AdminGate, models: dict[str, "ModelRuntime"]) -> None:
        self.gate = gate
        self._models = models  # the daemon's own table, changed in place by reloads

    def _current(self, model_id: str) -> "ModelRuntime":
        rt = self._models.get(model_id)
        if rt is None:
            raise E.UnknownModel(f"model {model_id!r} is not declared", model=model_id)
        return rt

    async def load(self, model_id: str, force: bool = False) -> dict[str, Any]:
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            started = rt.start("operator load", wanted=True, force=force)
            return {"state": rt.state.value, "started": started}

    async def unload(self, model_id: str) -> dict[str, Any]:
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            await rt.stop("operator unload")
            return {"state": rt.state.value}

    async def release(self, model_id: str) -> dict[str, Any]:
        async with self.gate.hold(model_id):
            return {"state": await self._current(model_id).release()}

    async def rollback(self, model_id: str, revision: str | None) -> dict[str, Any]:
        async with self.gate.hold(model_id):
            rt = self._current(model_id)
            state = await rt.rollback(revision, "operator rollback")
            return {"state": state, "revision": rt.running.revision}

    async def repair(self, model_id: str) -> dict[str, Any]:
        async with self.gate.hold(model_id):
            # Fetch what admission found missing or corrupt, verify, re-admit.
            return await modelrepair.repair(self._current(model_id))
