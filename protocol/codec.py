"""Framing: [protocol id+version frame, msgpack body]; the only module that touches msgpack."""

from __future__ import annotations

from typing import Any

import msgpack

from protocol import limits
from protocol.errors import BadRequest
from protocol.messages import TO_CLIENT, TO_SUPERVISOR_FROM_WORKER, Message, from_wire

PROTOCOL = b"LMX/1"
# Frames above this are refused by ZeroMQ itself (MAXMSGSIZE) and again here after decoding.
MAX_FRAME_BYTES = 8 * 1024 * 1024


class ProtocolMismatch(BadRequest):
    """The peer speaks another protocol or version; details carry expected/got."""


def encode(msg: Message) -> list[bytes]:
    """The frames of `msg`; BadRequest (the caller's) when msgpack cannot encode it: a string with a
    lone surrogate (no UTF-8 for it), nesting past msgpack's limit, a value of no wire type."""
    try:
        body = msgpack.packb([msg.TAG, msg.to_wire()], use_bin_type=True)
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{msg.TAG}: a string has a lone surrogate (U+{ord(exc.object[exc.start]):04X}), "
                         "which is not Unicode text", reason="lone_surrogate") from None
    except (ValueError, TypeError, OverflowError) as exc:  # msgpack's nesting limit, unknown types, big ints
        raise BadRequest(f"{msg.TAG}: the message cannot be encoded: {str(exc)[:200]}") from None
    return [PROTOCOL, body]


def check(msg: Message) -> None:
    """BadRequest unless `msg` would pass the peer's decode (field types, nesting, then bounds): a
    sender that checks first fails a bad message by itself, before the wire."""
    wire = msg.to_wire()
    limits.check_depth([msg.TAG, wire])
    from_wire(type(msg), wire)
    limits.check(msg)


def decode(frames: list[bytes], table: dict[str, type[Message]]) -> Message:
    """Decode [protocol, body] using the message table of one direction. A refusal of a body whose
    request id could be read is an InvalidMessage carrying that id, so its reply can name it."""
    if len(frames) != 2:
        raise BadRequest(f"expected 2 frames (protocol, body), got {len(frames)}")
    proto, body = frames
    if proto != PROTOCOL:
        raise ProtocolMismatch(
            f"protocol mismatch: expected {PROTOCOL.decode()}, got {proto[:32]!r}",
            expected=PROTOCOL.decode(),
            got=proto[:32].decode("utf-8", "replace"),
        )
    if len(body) > MAX_FRAME_BYTES:
        raise BadRequest(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        decoded: Any = msgpack.unpackb(body, raw=False, **limits.UNPACK_OPTIONS)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"malformed msgpack body: {type(exc).__name__}") from None
    rid = _request_id(decoded)
    try:
        return _build(decoded, table)
    except BadRequest as exc:
        if rid is None:
            raise
        raise InvalidMessage(exc, rid) from None


class InvalidMessage(BadRequest):
    """A message read as far as its request id whose type, fields or bounds are wrong: the error
    belongs to that one request (`request_id`), not to the connection it came on."""

    def __init__(self, exc: BadRequest, request_id: str) -> None:
        super().__init__(exc.message, **exc.details)
        self.request_id = request_id


def _request_id(decoded: Any) -> str | None:
    """The request id of a [tag, {fields}] body, when it is one a reply may carry back."""
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[1], dict)):
        return None
    rid = decoded[1].get("request_id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= limits.MAX_ID_CHARS else None


def _build(decoded: Any, table: dict[str, type[Message]]) -> Message:
    if table is not TO_CLIENT:  # peers we serve; the client trusts its (authenticated) supervisor's shapes
        limits.check_depth(decoded)
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[0], str)):
        raise BadRequest("body must be [tag, fields]")
    tag, fields = decoded
    cls = table.get(tag)
    if cls is None:
        raise BadRequest(f"unknown or misdirected message type {tag[:64]!r}")
    msg = from_wire(cls, fields)
    limits.check(msg, from_worker=table is TO_SUPERVISOR_FROM_WORKER)
    return msg


def encode_event(name: str, fields: dict[str, Any]) -> list[bytes]:
    """An event on the PUB socket: [name (the subscription prefix), protocol, msgpack fields]."""
    return [name.encode(), PROTOCOL, msgpack.packb(fields, use_bin_type=True, default=str)]


def decode_event(frames: list[bytes]) -> dict[str, Any]:
    if len(frames) != 3 or frames[1] != PROTOCOL:
        raise ProtocolMismatch(f"not an {PROTOCOL.decode()} event", expected=PROTOCOL.decode())
    try:
        fields = msgpack.unpackb(frames[2], raw=False)
    except Exception as exc:
        raise BadRequest(f"malformed msgpack event: {type(exc).__name__}") from None
    if not isinstance(fields, dict):
        raise BadRequest("event body must be a map")
    return {"event": frames[0].decode("utf-8", "replace"), **fields}
