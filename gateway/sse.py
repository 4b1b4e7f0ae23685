"""The HTTP response of one generation: status decided by its first event, SSE framing, and a client
that goes away cancelling the generation in its worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncGenerator

import structlog
from starlette.types import Receive, Scope, Send

from protocol import errors as E

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
JSON_HEADERS = [(b"content-type", b"application/json")]

log = structlog.get_logger("lmx.gateway")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    # The body was read by the endpoint, so the next message the server has for us is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(task: asyncio.Future) -> None:
    # One cancel() is not always enough on Python 3.11: protocol.client awaits chunks through
    # asyncio.wait_for, which swallows a cancellation that lands as its inner get() completes
    # (CPython gh-86296), and while decoding a chunk is always about to arrive. Asking again
    # until the task has ended makes the disconnect reach the worker every time.
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=0.05)


def _as_lmx(exc: Exception) -> E.LmxError:
    if isinstance(exc, E.LmxError):
        return exc
    log.exception("gateway.internal_error")
    return E.InternalError(f"internal error in the gateway: {exc!r}")


class GenerationResponse:
    """ASGI response over `events`, an async generator of a dialect's objects that raises LmxError;
    the dialect (gateway/dialect.py) frames them and shapes the errors.

    Nothing is sent before the first event: a failure before anything was generated (unknown
    model, quarantine, overload...) is the dialect's JSON error with the code's HTTP status. Once
    the stream started, a failure is the dialect's error_event, last (chat and completions: a
    `data: {"error": ...}` event; Anthropic's `event: error`; the Responses API's `error` then
    `response.failed`), and the stream ends without the dialect's end (`[DONE]`, message_stop,
    response.completed), so no client can take the cut for a complete answer.

    A disconnect is watched for the whole time, also while no token is coming (prefill, queue):
    the events task is cancelled, which closes the GenerateStream, which sends `cancel`."""

    def __init__(self, events: AsyncGenerator[dict, None], *, streaming: bool, request_id: str,
                 dialect: Any) -> None:
        self._events = events
        self._streaming = streaming
        self._request_id = request_id
        self._dialect = dialect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = asyncio.ensure_future(self._respond(scope, receive, send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        gone = False
        try:
            await asyncio.wait((body, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not body.done():
                gone = True
                await _cancel(body)
            try:
                await body
            except asyncio.CancelledError:
                if not gone:
                    raise
        finally:
            watcher.cancel()
            if not body.done():  # we were cancelled ourselves (server shutdown)
                await _cancel(body)
            # Suspended at a yield (a send was slow): GeneratorExit closes its GenerateStream.
            await self._events.aclose()
            if gone:
                log.info("gateway.client_disconnected", request_id=self._request_id)

    def _headers(self, base: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return base + [(k.encode(), v.encode()) for k, v in self._dialect.id_headers(self._request_id).items()]

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            first = await self._events.__anext__()
        except Exception as exc:  # StopAsyncIteration included: a generator that yields nothing is a bug
            err = _as_lmx(exc)
            log.info("gateway.request_failed", request_id=self._request_id, code=err.code.code)
            await self._dialect.error_response(err, self._dialect.id_headers(self._request_id))(scope, receive, send)
            return
        if not self._streaming:
            data = dumps(first)
            headers = self._headers(JSON_HEADERS) + [(b"content-length", str(len(data)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        await send({"type": "http.response.start", "status": 200, "headers": self._headers(SSE_HEADERS)})
        await send({"type": "http.response.body", "body": self._dialect.frame(first), "more_body": True})
        while True:
            try:
                obj = await self._events.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                err = _as_lmx(exc)
                log.info("gateway.stream_failed", request_id=self._request_id, code=err.code.code)
                await send({"type": "http.response.body", "body": self._dialect.error_event(err), "more_body": False})
                return
            await send({"type": "http.response.body", "body": self._dialect.frame(obj), "more_body": True})
        await send({"type": "http.response.body", "body": self._dialect.done or b"", "more_body": False})
