"""One model's request queue: at most one request on the worker, the rest waiting, each with a sink
(the client's stream or the canary) and an optional deadline."""

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
    def __init__(self, model_id: str, send: Send) -> None:
        self._model_id = model_id
        self._send = send
        self._ids = itertools.count(1)
        # Unique across supervisor runs: an adopted worker may still send results for a request
        # of the previous run, which must never match one of ours.
        self._prefix = secrets.token_hex(4)
        self.active: Pending | None = None
        self._queue: collections.deque[Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue) + (1 if self.active else 0)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, req: GenerateRequest, sink: Sink, bounded: bool = True) -> str:
        if bounded and len(self._queue) >= MAX_QUEUE:
            raise E.Overloaded(f"model {self._model_id} has {len(self._queue)} queued requests",
                               retry_after_s=1.0)
        wrid = f"{self._prefix}-{next(self._ids)}"
        pending = Pending(wrid, dataclasses.replace(req, request_id=wrid), sink, req.request_id)
        if req.timeout_s is not None:
            pending.timer = asyncio.get_running_loop().call_later(req.timeout_s, self.expire, wrid)
        self._queue.append(pending)
        self.dispatch()
        return wrid

    def dispatch(self) -> None:
        if self.active is not None or not self._queue:
            return
        nxt = self._queue[0]
        if self._send(nxt.req):
            self.active = self._queue.popleft()

    def on_result(self, msg: Message) -> None:
        p = self.active
        if p is None or p.wrid != getattr(msg, "request_id", None):
            return
        p.sink(msg)
        if isinstance(msg, (Final, Error)):
            if p.timer:
                p.timer.cancel()
            self.active = None
            self.dispatch()

    def end(self, wrid: str, exc: E.LmxError) -> None:
        """End one request for its client now; an active one is also cancelled in the worker
        (which stays busy with it until it answers, so the next request waits for that)."""
        for p in list(self._queue):
            if p.wrid == wrid:
                self._queue.remove(p)
                self._finish(p, exc)
                return
        p = self.active
        if p is not None and p.wrid == wrid and p.sink is not _discard:
            self._finish(p, exc)
            self._send(Cancel(wrid))

    def cancel(self, wrid: str) -> None:
        self.end(wrid, E.Cancelled("cancelled by client"))

    def expire(self, wrid: str) -> None:
        self.end(wrid, E.RequestTimeout("request deadline passed"))

    @staticmethod
    def _finish(p: Pending, exc: E.LmxError) -> None:
        if p.timer:
            p.timer.cancel()
        sink, p.sink = p.sink, _discard
        sink(Error.from_exc(p.wrid, exc))

    def fail_all(self, exc: E.LmxError) -> None:
        pending = ([self.active] if self.active else []) + list(self._queue)
        self.active = None
        self._queue.clear()
        for p in pending:
            self._finish(p, exc)
