"""The worker-side ROUTER socket: every worker connects here; messages are routed by worker token."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Protocol

import zmq
import zmq.asyncio

from protocol import codec
from protocol.endpoint import worker_identities
from protocol.messages import TO_SUPERVISOR_FROM_WORKER, Message
from supervisor import logs
from supervisor.ratelimit import LogLimit


DRAIN_MAX = 256  # messages handled per wake-up before yielding to the loop


class WorkerPeer(Protocol):
    def on_worker_message(self, msg: Message) -> None: ...

    def on_worker_garbage(self, error: Exception) -> None: ...


class WorkerHub:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, socket_path: Path) -> None:
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(endpoint)
        os.chmod(socket_path, 0o600)
        self._peers: dict[bytes, WorkerPeer] = {}
        self._task: asyncio.Task | None = None
        self._strangers: set[bytes] = set()  # logged once each: an orphan asks every heartbeat
        self.log = logs.get()
        self._log_limit = LogLimit(self.log)

    def register(self, token: str, peer: WorkerPeer) -> None:
        for identity in worker_identities(token):
            self._peers[identity] = peer

    def unregister(self, token: str) -> None:
        for identity in worker_identities(token):
            self._peers.pop(identity, None)

    def send(self, token: str, msg: Message) -> None:
        try:
            self._sock.send_multipart([token.encode(), *codec.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("worker.send_dropped", type=msg.TAG)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._recv_loop(), name="worker-hub")

    async def _recv_loop(self) -> None:
        # One await per wake-up, then whatever else is already queued without the poller's round
        # trip (a batch step sends a chunk per stream at once): less supervisor CPU per token.
        drain = zmq.Socket.shadow(self._sock.underlying)
        while True:
            self._handle(await self._sock.recv_multipart())
            for _ in range(DRAIN_MAX):
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        peer = self._peers.get(identity)
        if peer is None:
            if identity not in self._strangers and len(self._strangers) < 10_000:
                self._strangers.add(identity)
                # The identity is a worker's secret token: log a digest, never the token. And a
                # flood of strangers gets a trickle of lines, not one each.
                self._log_limit.log("warning", "worker.unknown_peer",
                                    identity_sha256=hashlib.sha256(identity).hexdigest()[:12])
            return
        try:
            msg = codec.decode(rest, TO_SUPERVISOR_FROM_WORKER)
        except Exception as exc:
            peer.on_worker_garbage(exc)
            return
        try:
            peer.on_worker_message(msg)
        except Exception:
            self.log.exception("internal.worker_message_failed", type=msg.TAG)

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        self._sock.close(linger=0)
