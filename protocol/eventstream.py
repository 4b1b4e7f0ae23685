"""The supervisor's lifecycle events as an async iterator (ZeroMQ SUB on the state dir's events socket).
Import it from protocol.client, with the rest of the client library."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import zmq
import zmq.asyncio

from protocol import codec
from protocol import errors as E


class EventStream:
    """The supervisor's lifecycle events (model.state, model.failed, ...), each a dict with `event`,
    `ts`, `seq` and its fields. Only events published after subscribing arrive (ZeroMQ PUB/SUB); a
    gap in `seq` means events were dropped because this reader fell behind."""

    def __init__(self, endpoint: str, prefixes: tuple[str, ...]) -> None:
        if endpoint.startswith("ipc://") and not os.path.exists(endpoint[6:]):
            raise E.SupervisorUnavailable(f"no events socket at {endpoint[6:]} (is lmx-supervisor running?)",
                                          endpoint=endpoint)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        for prefix in prefixes or ("",):
            self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(endpoint)

    async def connected(self, timeout_s: float = 5.0) -> None:
        """Wait until the connection is up (subscriptions go out right after the handshake), so
        events published from now on arrive: PUB/SUB drops what is sent before that."""
        if self._monitor is None:
            return
        try:
            await asyncio.wait_for(self._monitor.recv_multipart(), timeout_s)
        except asyncio.TimeoutError:
            raise E.SupervisorUnavailable(f"events socket did not answer within {timeout_s}s") from None
        finally:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._sock.closed:
                raise StopAsyncIteration
            frames = await self._sock.recv_multipart()
            try:
                return codec.decode_event(frames)
            except E.LmxError:
                continue  # not ours: skip it rather than end the stream

    async def next(self, timeout_s: float) -> dict[str, Any]:
        """The next event within `timeout_s`, else REQUEST_TIMEOUT."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except asyncio.TimeoutError:
            raise E.RequestTimeout(f"no event within {timeout_s}s") from None

    async def aclose(self) -> None:
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
