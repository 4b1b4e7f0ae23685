"""One model's requests: those on the worker (up to its batch size), the rest waiting, each with a
sink (the client's stream or the canary) and a deadline."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import secrets
from dataclasses import dataclass
from typing import Callable

from protocol import errors as E
from protocol.messages import Cancel, Error, Final, GenerateRequest, Message

Sink = Callable[[Message], None]
Send = Callable[[Message], bool]  # -> False when there is no worker to send to
MAX_QUEUE = 64


def _discard(_: Message) -> None:
    pass


@dataclass
class Pending:
    wrid: str
    req: GenerateRequest
    sink: Sink
    origin_id: str  # the client's own request id ("" for the canary), for crash records
    timer: asyncio.TimerHandle | None = None


class RequestQueue:
    """Up to `max_active` requests on the worker (its batch), up to `max_queue` more waiting; past
    that, OVERLOADED at once with a retry hint. Never an unbounded queue. `ended` is called each
    time requests leave, however they leave (a result, a cancel, a deadline, a death): a drain
    waits on it."""

    def __init__(self, model_id: str, send: Send, max_active: int = 1, max_queue: int = MAX_QUEUE,
                 ended: Callable[[], None] = lambda: None) -> None:
        self._model_id = model_id
        self._send = send
        self._ended = ended
        self.max_active = max(1, max_active)
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        # Unique across supervisor runs: an adopted worker may still send results for a request
        # of the previous run, which must never match one of ours.
        self._prefix = secrets.token_hex(4)
        self.active: dict[str, Pending] = {}
        self._queue: collections.deque[Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue) + len(self.active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, req: GenerateRequest, sink: Sink, bounded: bool = True) -> str:
        if bounded and len(self.active) >= self.max_active and len(self._queue) >= self.max_queue:
            raise E.Overloaded(f"model {self._model_id} has {len(self.active)} running and {len(self._queue)} "
                               f"queued requests (max_queue {self.max_queue})", retry_after_s=1.0)
        wrid = f"{self._prefix}-{next(self._ids)}"
        pending = Pending(wrid, dataclasses.replace(req, request_id=wrid), sink, req.request_id)
        if req.timeout_s is not None:
            pending.timer = asyncio.get_running_loop().call_later(req.timeout_s, self.expire, wrid)
        self._queue.append(pending)
        self.dispatch()
        return wrid

    def dispatch(self) -> None:
        while len(self.active) < self.max_active and self._queue:
            if not self._send(self._queue[0].req):
                return
            p = self._queue.popleft()
            self.active[p.wrid] = p

    def on_result(self, msg: Message) -> None:
        p = self.active.get(getattr(msg, "request_id", None) or "")
        if p is None:
            return
        p.sink(msg)
        if isinstance(msg, (Final, Error)):
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
        p = self.active.get(wrid)
        if p is not None and p.sink is not _discard:
            self._finish(p, exc)
            self._send(Cancel(wrid))

    def cancel(self, wrid: str) -> None:
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
        pending = list(self.active.values()) + list(self._queue)
        self.active.clear()
        self._queue.clear()
        for p in pending:
            self._finish(p, exc)
        if pending:
            self._ended()
