"""Reading a request's body: bounded before it is read (a declared length past the bound is refused
unread, a chunked body is counted as it comes), decompressed when its Content-Encoding says gzip or
deflate (bounded after decompression too, so a small bomb is refused at the bound, never inflated
in memory), and parsed as JSON. A response sent before its request's body was read to the end
(refused at the bound, or before the body was looked at) closes its connection: CloseUnread."""

from __future__ import annotations

import asyncio
import json
import re
import time
import zlib
from typing import Any

import structlog
from starlette.requests import Request

from protocol import errors as E
from protocol import limits

log = structlog.get_logger("lmx.gateway")

# The largest body whose fields can pass the wire's bounds: MAX_PROMPT_CHARS characters, each up to
# 12 bytes as a JSON escape (a surrogate pair), plus the rest. Past it the body is not even read.
MAX_BODY_BYTES = 32 * 1024 * 1024

# zlib's wbits: 16+ reads a gzip header, a plain 15 zlib's (HTTP's "deflate").
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


# A body that has not arrived this long after its headers is refused: a client that sends its
# headers and then trickles (or stops) holds a connection and a request slot for nothing.
BODY_TIMEOUT_S = 60.0


async def read(request: Request, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request)
    except TimeoutError:
        raise E.BadRequest(f"the request body did not arrive within {timeout_s:g} s") from None


async def _read(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise E.BadRequest(f"the request body has {declared} bytes, more than {MAX_BODY_BYTES}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *_WBITS):
        raise E.BadRequest(f"content-encoding {encoding[:32]!r} is not supported (gzip, deflate or none)")
    inflate = zlib.decompressobj(_WBITS[encoding]) if encoding in _WBITS else None
    parts, size = [], 0
    async for part in request.stream():  # chunked bodies declare no length: count as they come
        if inflate is not None:
            part = _inflate(inflate, part, MAX_BODY_BYTES - size)
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise E.BadRequest(f"the request body has more than {MAX_BODY_BYTES} bytes")
        parts.append(part)
    if inflate is not None and not inflate.eof:
        raise E.BadRequest(f"the {encoding} request body is truncated")
    return b"".join(parts)


def _inflate(inflate: Any, part: bytes, room: int) -> bytes:
    try:
        out = inflate.decompress(part, room + 1)  # one byte past the room: enough to know it is over
    except zlib.error as exc:
        raise E.BadRequest(f"the request body is not valid compressed data: {exc}") from None
    if inflate.unconsumed_tail:  # more output waits than the bound leaves room for
        raise E.BadRequest(f"the request body has more than {MAX_BODY_BYTES} bytes once decompressed")
    return out


async def json_body(request: Request, timeout_s: float = BODY_TIMEOUT_S) -> Any:
    raw = await read(request, timeout_s)
    try:
        try:
            value = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise E.BadRequest(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # json's C scanner stops at the interpreter's recursion limit
            raise E.BadRequest(f"the request body nests deeper than {limits.MAX_JSON_DEPTH} levels",
                               reason="too_deep") from None
        check_json(value)
    except E.BadRequest as exc:
        refusals.note(exc, request.url.path)
        raise
    return value


# A lone surrogate (U+D800..U+DFFF unpaired): JSON's \ud800 escape decodes to one, and nothing can
# encode it as UTF-8 (the wire, a log line, a response). A valid pair decodes to one character.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json(value: Any) -> None:
    """BAD_REQUEST for a value nested deeper than limits.MAX_JSON_DEPTH or holding a lone surrogate
    in any string (a key too): walked with a stack, never recursion, so no input can exhaust it."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if (found := _SURROGATE.search(item)) is not None:
                raise E.BadRequest(f"the request body has a string with a lone surrogate (U+{ord(found.group()):04X}):"
                                   " it is not Unicode text", reason="lone_surrogate")
            continue
        if isinstance(item, dict):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limits.MAX_JSON_DEPTH:
            raise E.BadRequest(f"the request body nests deeper than {limits.MAX_JSON_DEPTH} levels", reason="too_deep")
        stack.extend((child, depth + 1) for child in children)


LOG_EVERY_S = 60.0  # one line per kind of malformed body per this, with the count since start


class Refusals:
    """Malformed bodies (not JSON, too deep, a lone surrogate...) are the client's 400, counted and
    logged at warning at most once per LOG_EVERY_S per reason: never a traceback, never a line per
    request that a hostile client could flood the log with."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def note(self, exc: E.BadRequest, path: str) -> None:
        reason = str(exc.details.get("reason") or "bad_body")
        count = self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[reason] = now
            log.warning("gateway.malformed_body", reason=reason, path=path, count=count,
                        message=exc.message[:200], log_every_s=LOG_EVERY_S)


refusals = Refusals()


class CloseUnread:
    """ASGI middleware: a response that starts before its request's body has been read to its end
    says `Connection: close`, and uvicorn closes the connection once it is sent. Kept alive, the
    connection would go on receiving the rest of that body (a chunked body refused at the bound, a
    declared length refused from its headers, a body that a 401 or a 429 never read), which the
    server would take for the next request's head (gateway/connections.py answers a head past its
    bound with 431) and answer to whatever request the client sends next on that connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ended = not _has_body(scope["headers"])

        async def receive_watched() -> Any:
            nonlocal ended
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                ended = True
            return message

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and not ended:
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_watched, send_closing)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's headers announce a body: any transfer-encoding, or a length past 0."""
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False
