"""Who may do what. Over ipc the socket is 0600 in a 0700 dir, so only the owner connects and the
owner is admin. Over the optional tcp endpoint every client proves a CURVE key from the allow-list
(`[[clients]]`, parsed with the config in supervisor/clients.py) in the ZAP handshake, and its key's
role decides which ops it may use."""

from __future__ import annotations

import hashlib
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85

from protocol import errors as E
from protocol.admin import AdminOp, AdminRequest
from protocol.messages import Message
from supervisor.clients import ClientKey
from supervisor.logs import LogLimit

# Everything else needs admin, including ops added later: new ops are denied until listed here.
READ_MESSAGES = frozenset({"status", "generate", "count_tokens", "cancel", "history"})
READ_ADMIN_OPS = frozenset({"verify", "compat", "metrics"})
PEER_MESSAGES = frozenset({"rank_place", "rank_send", "rank_end"})
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"lmx"


def op_name(msg: Message) -> str:
    """An admin operation by its op name, typed (`OP`) or legacy (`op`): one role whichever wire."""
    if isinstance(msg, AdminRequest):
        return msg.op
    return msg.OP if isinstance(msg, AdminOp) else msg.TAG


def allowed(role: str | None, msg: Message) -> bool:
    if role == "admin":
        return True
    if role == "peer":
        return msg.TAG in PEER_MESSAGES
    if role != "read":
        return False
    if isinstance(msg, (AdminRequest, AdminOp)):
        return op_name(msg) in READ_ADMIN_OPS
    return msg.TAG in READ_MESSAGES


def key_digest(public_key_z85: bytes) -> str:
    """How logs name a key they must not print: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(public_key_z85).hexdigest()[:12]


class Access:
    """Roles of the remote endpoint's clients, by the key each proved in its CURVE handshake (the
    ZAP User-Id). Not by name: after a reload that gives a revoked key's name to another key, a
    connection that proved the old key would otherwise carry on with the new key's role."""

    def __init__(self, clients: tuple[ClientKey, ...], log: Any) -> None:
        self.update(clients)
        self._limit = LogLimit(log)

    def update(self, clients: tuple[ClientKey, ...]) -> None:
        """Reload: from the next request on, every connection gets its key's role, or nothing."""
        self.clients = {c.public_key: c for c in clients}

    @property
    def names(self) -> list[str]:
        return sorted(c.name for c in self.clients.values())

    def check(self, user_id: str | None, msg: Message) -> None:
        """Raise UNAUTHORIZED (and log auth.denied, rate-limited) unless the client's role allows msg."""
        client = self.clients.get(user_id or "")
        role = client.role if client is not None else None
        if allowed(role, msg):
            return
        op = op_name(msg)[:64]
        self._limit.log("warning", "auth.denied", op=op, client=client.name if client else None, role=role,
                        key_sha256=key_digest((user_id or "").encode()))
        raise E.Unauthorized(f"{op} needs the admin role" if role else "this client is no longer allowed",
                             op=op, role=role)


class ZapHandler:
    """ZeroMQ's authentication hook (RFC 27) for one context: CURVE keys on the allow-list pass,
    with their public key (z85) as User-Id, which Access maps to a role; anything else is refused
    inside the handshake, so a refused peer never gets a message through."""

    def __init__(self, ctx: zmq.asyncio.Context, clients: tuple[ClientKey, ...], log: Any) -> None:
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._limit = LogLimit(log)
        self.update(clients)

    def update(self, clients: tuple[ClientKey, ...]) -> None:
        self.keys = {c.public_key.encode(): c for c in clients}

    async def run(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            await self._sock.send_multipart(self.reply(frames))

    def reply(self, frames: list[bytes]) -> list[bytes]:
        # [version, request id, domain, address, routing id, mechanism, credentials...]
        rid = frames[1] if len(frames) > 1 else b""
        if len(frames) < 6 or frames[0] != b"1.0":
            return [b"1.0", rid, b"500", b"malformed ZAP request", b"", b""]
        address, mechanism, creds = frames[3], frames[5], frames[6:]
        if frames[2] != ZAP_DOMAIN or mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self._limit.log("warning", "auth.refused", address=address.decode("utf-8", "replace"),
                            reason=f"mechanism {mechanism.decode('ascii', 'replace')[:16]}, not CURVE")
            return [b"1.0", rid, b"400", b"CURVE required", b"", b""]
        key = zmq.utils.z85.encode(creds[0])
        client = self.keys.get(key)
        if client is None:
            self._limit.log("warning", "auth.refused", address=address.decode("utf-8", "replace"),
                            key_sha256=key_digest(key), reason="key not in [[clients]]")
            return [b"1.0", rid, b"400", b"unknown key", b"", b""]
        self._limit.log("info", "auth.accepted", address=address.decode("utf-8", "replace"), client=client.name,
                        role=client.role)
        return [b"1.0", rid, b"200", b"OK", key, b""]

    def close(self) -> None:
        self._sock.close(linger=0)
