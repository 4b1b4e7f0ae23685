"""One model's requests: those on the worker (up to its batch size), the rest waiting, each with a
sink (the client's stream or the canary) and a deadline. Token counts go to the worker at once, beside
the batch (it answers them between two steps), never queued behind generations."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import secrets
from dataclasses import dataclass
from typing import Callable

from protocol import errors as E
from protocol.messages import (
    Cancel, CountTokens, Embeddings, Error, Final, GenerateRequest, Message, RerankScores, TokenCount,
)

Sink = Callable[[Message], None]
Send = Callable[[Message], bool]  # -> False when there is no worker to send to
MAX_QUEUE = 64
MAX_COUNTS = 64  # token counts in flight per model; each is answered within one decode step


def _discard(_: Message) -> None:
    pass


@dataclass
class Pending:
    wrid: str
    req: GenerateRequest | CountTokens
    sink: Sink
    origin_id: str  # the client's own request id ("" for the canary), for crash records
    timer: asyncio.TimerHandle | None = None
    batch: bool = False  # priority "batch": waits behind every interactive request
    deadline: float | None = None  # the loop's clock, when timeout_s was given


class Waiting:
    """The requests waiting for a batch slot: interactive ones first, in arrival order, then batch
    ones (an API key's priority), so a bulk job queued first never holds a chat back."""

    def __init__(self) -> None:
        self._interactive: collections.deque[Pending] = collections.deque()
        self._batch: collections.deque[Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._interactive) + len(self._batch)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return itertools.chain(self._interactive, self._batch)

    def append(self, p: Pending) -> None:
        (self._batch if p.batch else self._interactive).append(p)

    def first(self) -> Pending:
        return self._interactive[0] if self._interactive else self._batch[0]

    def popleft(self) -> Pending:
        return self._interactive.popleft() if self._interactive else self._batch.popleft()

    def remove(self, p: Pending) -> None:
        (self._batch if p.batch else self._interactive).remove(p)

    def clear(self) -> None:
        self._interactive.clear()
        self._batch.clear()


class RequestQueue:
    """Up to `max_active` requests on the worker (its batch), up to `max_queue` more waiting; past
    that, OVERLOADED at once with a retry hint. Never an unbounded queue. A drain (`drained`) wakes
    each time requests leave, however they leave (a result, a cancel, a deadline, a death)."""

    def __init__(self, model_id: str, send: Send, max_active: int = 1, max_queue: int = MAX_QUEUE) -> None:
        self._model_id = model_id
        self._send = send
        self._idle: asyncio.Event | None = None  # while draining: set when the last request leaves
        self.max_active = max(1, max_active)
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        # Unique across supervisor runs: an adopted worker may still send results for a request
        # of the previous run, which must never match one of ours.
        self._prefix = secrets.token_hex(4)
        self.active: dict[str, Pending] = {}
        self._queue = Waiting()
        self.counting: dict[str, Pending] = {}  # token counts sent, not answered yet

    def __len__(self) -> int:
        return len(self._queue) + len(self.active) + len(self.counting)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def drained(self, grace_s: float) -> None:
        """Until no request is left, for at most grace_s."""
        self._idle = asyncio.Event()
        self._ended()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        self._idle = None  # a cancelled drain leaves an Event nobody awaits: harmless

    def _ended(self) -> None:
        if self._idle is not None and not len(self):
            self._idle.set()

    def add(self, req: GenerateRequest | CountTokens, sink: Sink, bounded: bool = True) -> str:
        if isinstance(req, CountTokens):
            return self._count(req, sink)
        if bounded and len(self.active) >= self.max_active and len(self._queue) >= self.max_queue:
            raise E.Overloaded(f"model {self._model_id} has {len(self.active)} running and {len(self._queue)} "
                               f"queued requests (max_queue {self.max_queue})", retry_after_s=1.0)
        pending = self._pending(req, sink)
        self._queue.append(pending)
        self.dispatch()
        return pending.wrid

    def _pending(self, req: GenerateRequest | CountTokens, sink: Sink) -> Pending:
        wrid = f"{self._prefix}-{next(self._ids)}"
        batch = getattr(req, "priority", "interactive") == "batch"
        # The priority is the supervisor's to act on: left off what the worker gets (an adopted
        # older worker would refuse the field).
        sent = dataclasses.replace(req, request_id=wrid, priority="interactive") if batch \
            else dataclasses.replace(req, request_id=wrid)
        pending = Pending(wrid, sent, sink, req.request_id, batch=batch)
        if req.timeout_s is not None:
            loop = asyncio.get_running_loop()
            pending.deadline = loop.time() + req.timeout_s
            pending.timer = loop.call_later(req.timeout_s, self.expire, wrid)
        return pending

    def _count(self, req: CountTokens, sink: Sink) -> str:
        if len(self.counting) >= MAX_COUNTS:
            raise E.Overloaded(f"model {self._model_id} has {len(self.counting)} token counts in flight",
                               retry_after_s=1.0)
        pending = self._pending(req, sink)
        if not self._send(pending.req):
            if pending.timer:
                pending.timer.cancel()
            raise E.ModelNotReady(f"model {self._model_id} has no worker to count on", retry_after_s=1.0)
        self.counting[pending.wrid] = pending
        return pending.wrid

    def dispatch(self) -> None:
        while len(self.active) < self.max_active and self._queue:
            if not self._send(self._queue.first().req):
                return
            p = self._queue.popleft()
            self.active[p.wrid] = p

    def on_result(self, msg: Message) -> None:
        rid = getattr(msg, "request_id", None) or ""
        p = self.active.get(rid)
        if p is None:
            counted = self.counting.pop(rid, None) if isinstance(msg, (TokenCount, Error)) else None
            if counted is not None:
                if counted.timer:
                    counted.timer.cancel()
                counted.sink(msg)
                self._ended()
            return
        p.sink(msg)
        if isinstance(msg, (Final, Embeddings, RerankScores, Error)):  # an embedding or a rerank: one reply
            if p.timer:
                p.timer.cancel()
            del self.active[p.wrid]
            self.dispatch()
            self._ended()

    def end(self, wrid: str, exc: E.LmxError) -> None:
        """End one request for its client now; an active one is also cancelled in the worker, and
        keeps its slot until the worker confirms (within one decode step)."""
        for p in list(self._queue):
            if p.wrid == wrid:
                self._queue.remove(p)
                self._finish(p, exc)
                self._ended()
                return
        counted = self.counting.pop(wrid, None)  # the worker's answer, if it still comes, is dropped
        if counted is not None:
            self._finish(counted, exc)
            self._ended()
            return
        p = self.active.get(wrid)
        if p is not None and p.sink is not _discard:
            self._finish(p, exc)
            self._send(Cancel(wrid))

    def cancel(self, wrid: str) -> None:
        # A client's cancel that comes as (or after) its deadline passes is that deadline: one code,
        # REQUEST_TIMEOUT, whichever side's timer fired first.
        p = self.active.get(wrid) or self.counting.get(wrid) or next((q for q in self._queue if q.wrid == wrid), None)
        if p is not None and p.deadline is not None and asyncio.get_running_loop().time() >= p.deadline:
            self.expire(wrid)
            return
        self.end(wrid, E.Cancelled("cancelled by client"))

    def expire(self, wrid: str) -> None:
        self.end(wrid, E.RequestTimeout("request deadline passed"))

    def first_active_origin(self) -> str | None:
        """For a crash record: which request the worker was serving (the canary's id is "")."""
        p = next(iter(self.active.values()), None)
        return None if p is None else (p.origin_id or "canary")

    @staticmethod
    def _finish(p: Pending, exc: E.LmxError) -> None:
        if p.timer:
            p.timer.cancel()
        sink, p.sink = p.sink, _discard
        sink(Error.from_exc(p.wrid, exc))

    def fail_all(self, exc: E.LmxError) -> None:
        pending = list(self.active.values()) + list(self._queue) + list(self.counting.values())
        self.active.clear()
        self._queue.clear()
        self.counting.clear()
        for p in pending:
            self._finish(p, exc)
        if pending:
            self._ended()
