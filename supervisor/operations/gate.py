"""The admin gate: named locks an operation holds across all its awaits, and the supervisor's one
drain flag (set once, when shutdown begins: no operation and no request starts after it)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from protocol import errors as E

# Reloads hold this besides their models' locks: two reloads never interleave, even when they
# touch no model in common (the second must compare against what the first left).
CONFIG_KEY = "\x00config"


class AdminGate:
    """Named asyncio locks, taken in sorted order (two operations on overlapping models cannot
    deadlock), plus the drain flag. An operation's awaits (a drain, a stop ladder) used to let a
    second one in on the same model: two reloads 50 ms apart each built a runtime for it, and the
    one overwritten in the table kept a worker nobody tracked."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    def drain(self) -> None:
        """From here on nothing new begins: operations are refused and waits on a model end."""
        self._drain.set()

    async def drained(self) -> None:
        """Returns once the drain has begun (an operation waiting for a model stops waiting)."""
        await self._drain.wait()

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        self.refuse_if_draining()
        self._active += 1
        self._idle.clear()
        taken: list[asyncio.Lock] = []
        try:
            for key in sorted(set(keys)):
                lock = self._locks.setdefault(key, asyncio.Lock())
                await lock.acquire()
                taken.append(lock)
            self.refuse_if_draining()  # it waited behind another operation while a drain began
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

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise E.ShuttingDown("supervisor is shutting down", retry_after_s=5.0)

    async def close(self, timeout_s: float) -> bool:
        """Refuse new operations, then wait (bounded) for those in flight; True when none is left."""
        self.drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
