"""The worker-side ROUTER socket: every worker connects here; a plain router from a worker's identities
(derived from its token) to its handle, which owns everything else about it."""

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
from protocol.loopreader import LoopReader
from protocol.messages import TO_SUPERVISOR_FROM_WORKER, Message
from supervisor import logs


class WorkerPeer(Protocol):
    """What the hub routes to: a worker's handle (supervisor.workers.handle.WorkerHandle)."""

    def on_worker_message(self, msg: Message) -> None: ...

    def on_worker_garbage(self, error: Exception) -> None: ...


class WorkerHub:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, socket_path: Path) -> None:
        # A plain socket read by the loop's reader callback (protocol.loopreader): a batch step's
        # chunks are handled in one turn of the loop, with no future per message.
        self._sock = zmq.Context.shadow(ctx.underlying).socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(endpoint)
        os.chmod(socket_path, 0o600)
        self._peers: dict[bytes, WorkerPeer] = {}
        self._task: asyncio.Task | None = None
        self._reader: LoopReader | None = None
        self._strangers: set[bytes] = set()  # logged once each: an orphan asks every heartbeat
        # Identities heard from since this supervisor started: a message to one not (yet) connected
        # would be dropped. A worker's main thread connects on its own, and after this supervisor
        # restarted it may reconnect after its IO thread's adoption hello.
        self._heard: set[bytes] = set()
        self.log = logs.get()
        self._log_limit = logs.LogLimit(self.log)

    def register(self, token: str, peer: WorkerPeer) -> None:
        for identity in worker_identities(token):
            self._peers[identity] = peer

    def unregister(self, token: str) -> None:
        for identity in worker_identities(token):
            self._peers.pop(identity, None)
            self._heard.discard(identity)

    def send(self, token: str, msg: Message, to_main: bool = False) -> bool:
        """To the worker's IO thread, or with `to_main` to its main thread's socket (requests and
        cancels, for a worker whose hello says it reads them there) once that socket has been heard
        from. True when it went to the main thread."""
        control, data = worker_identities(token)
        to_main = to_main and data in self._heard
        identity = data if to_main else control
        try:
            self._sock.send_multipart([identity, *codec.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("worker.send_dropped", type=msg.TAG)
        if self._reader is not None:
            self._reader.after_send()
        return to_main

    @property
    def task(self) -> asyncio.Task | None:
        """The reading task: it ends only when reading failed (the daemon exits on that)."""
        return self._task

    def start(self) -> None:
        self._reader = LoopReader(self._sock, self._handle)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="worker-hub")

    async def _watch(self) -> None:
        assert self._reader is not None
        await self._reader.failed  # reading failed: the daemon exits rather than stay deaf

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
        self._heard.add(identity)
        try:
            peer.on_worker_message(msg)
        except Exception:
            self.log.exception("internal.worker_message_failed", type=msg.TAG)

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._reader is not None:
            self._reader.close()
        self._sock.close(linger=0)
