"""What one HTTP connection may cost the gateway before it is a request: a bound on the bytes of its
request line and headers, on the time it takes to send them, and on how many connections are open
at once. uvicorn's httptools protocol bounds none of these (its parser buffers a header line of any
length, and a half-sent request holds its connection forever), so a few hundred idle clients
could lock everyone out and one huge header line could fill memory. This is that protocol with the
bounds; the time between requests on a kept-alive connection is uvicorn's own `timeout_keep_alive`,
and the body's time is bounded where the body is read (gateway/body.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger("lmx.gateway")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024      # open at once; past it a new connection gets 503 and is closed
    max_header_bytes: int = 64 * 1024  # request line and headers; past it 431 and closed
    header_timeout_s: float = 10.0   # from a request's first byte to its last header; past it 408
    keep_alive_s: float = 5.0        # idle between requests on a kept-alive connection


def _reply(transport: asyncio.BaseTransport, status: str, text: str) -> None:
    body = text.encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()
    if not transport.is_closing():
        transport.write(head + body)  # type: ignore[attr-defined]  (uvloop's transports are not asyncio's classes)
    transport.close()


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `limits` (set per server by protocol_class)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("gateway.connection_refused", reason="max_connections", limit=self.limits.max_connections)
            _reply(transport, "503 Service Unavailable", "too many connections\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _in_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("gateway.connection_closed", reason="header_timeout", limit_s=self.limits.header_timeout_s)
        _reply(self.transport, "408 Request Timeout", "the request's headers took too long\n")

    def data_received(self, data: bytes) -> None:
        head = self._in_head()
        if head and self._head_timer is None:  # a request's first bytes: its headers' clock starts
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        super().data_received(data)
        if head and self._head_timer is not None:  # headers still incomplete after this read
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._stop_head_timer()
                log.info("gateway.connection_closed", reason="header_too_large", limit=self.limits.max_header_bytes)
                _reply(self.transport, "431 Request Header Fields Too Large",
                       f"the request line and headers are over {self.limits.max_header_bytes} bytes\n")

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()


def protocol_class(limits: ConnectionLimits) -> type:
    """uvicorn's `http` protocol class, bounded by `limits`."""
    return type("BoundedProtocol", (BoundedProtocol,), {"limits": limits})
