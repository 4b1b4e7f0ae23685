"""The supervisor's lifecycle events as an async iterator (ZeroMQ SUB on the state dir's events socket),
read through protocol.loopreader like every other socket. Import it from protocol.client, with the
rest of the client library."""

from __future__ import annotations

import asyncio
import collections
import os
from typing import Any, Optional

import zmq

from protocol import codec
from protocol import errors as E
from protocol.loopreader import LoopReader

# Events read but not yet taken, at most: past it new ones are dropped, as ZeroMQ drops them for a
# subscriber that stops reading (its receive queue's default high-water mark), and `seq` shows the gap.
BACKLOG = 1000


class EventStream:
    """The supervisor's lifecycle events (model.state, model.failed, ...), each a dict with `event`,
    `ts`, `seq` and its fields. Only events published after subscribing arrive (ZeroMQ PUB/SUB); a
    gap in `seq` means events were dropped because this reader fell behind."""

    def __init__(self, endpoint: str, prefixes: tuple[str, ...]) -> None:
        if endpoint.startswith("ipc://") and not os.path.exists(endpoint[6:]):
            raise E.SupervisorUnavailable(f"no events socket at {endpoint[6:]} (is lmx-supervisor running?)",
                                          endpoint=endpoint)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        for prefix in prefixes or ("",):
            self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._monitor: Optional[zmq.Socket] = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(endpoint)
        # The readers need the running loop: made by the first await (sockets keep what arrives).
        self._reader: Optional[LoopReader] = None
        self._monitor_reader: Optional[LoopReader] = None
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._wake: Optional[asyncio.Event] = None
        self._up: Optional[asyncio.Event] = None
        self._closed = False
        self._failed: Optional[BaseException] = None

    def _start(self) -> None:
        if self._reader is not None or self._closed:
            return
        self._wake, self._up = asyncio.Event(), asyncio.Event()
        self._reader = LoopReader(self._sock, self._on_frames)
        self._reader.failed.add_done_callback(self._reader_failed)
        if self._monitor is not None:
            up = self._up
            self._monitor_reader = LoopReader(self._monitor, lambda frames: up.set())

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            event = codec.decode_event(frames)
        except E.LmxError:
            return  # not ours: skip it rather than end the stream
        if len(self._events) < BACKLOG:
            self._events.append(event)
            assert self._wake is not None
            self._wake.set()

    def _reader_failed(self, failed: asyncio.Future) -> None:
        if not failed.cancelled() and failed.exception() is not None:
            self._failed = failed.exception()
            assert self._wake is not None
            self._wake.set()

    async def connected(self, timeout_s: float = 5.0) -> None:
        """Wait until the connection is up (subscriptions go out right after the handshake), so
        events published from now on arrive: PUB/SUB drops what is sent before that."""
        if self._monitor is None:
            return
        self._start()
        assert self._up is not None
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise E.SupervisorUnavailable(f"events socket did not answer within {timeout_s}s") from None
        finally:
            self._close_monitor()

    def _close_monitor(self) -> None:
        if self._monitor_reader is not None:
            self._monitor_reader.close()
            self._monitor_reader = None
        if self._monitor is not None:
            if not self._sock.closed:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> dict[str, Any]:
        self._start()
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._events:
                return self._events.popleft()
            if self._failed is not None:
                raise E.SupervisorUnavailable(f"reading events failed: {self._failed!r}")
            assert self._wake is not None
            self._wake.clear()
            await self._wake.wait()

    async def next(self, timeout_s: float) -> dict[str, Any]:
        """The next event within `timeout_s`, else REQUEST_TIMEOUT."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except asyncio.TimeoutError:
            raise E.RequestTimeout(f"no event within {timeout_s}s") from None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_monitor()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._wake is not None:
            self._wake.set()  # a reader waiting in __anext__ ends
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
