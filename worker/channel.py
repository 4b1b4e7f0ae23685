"""The worker's IO thread: owns the ZeroMQ socket, heartbeats, and the watch on the supervisor."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import zmq

from protocol import codec
from protocol.exitcodes import WorkerExit
from protocol.messages import TO_WORKER, Cancel, Heartbeat, Message
from worker.log import log



class Progress:
    """Counters the main thread bumps and the IO thread reads (plain ints: atomic under the GIL)."""

    def __init__(self) -> None:
        self.count = 0
        self.phase = "starting"
        self.cancelled: set[str] = set()
        self.memory: Callable[[], dict] = dict


class Channel:
    """One DEALER socket to the supervisor, driven only by this thread; the main thread (busy in
    mlx) hands it messages over an inproc pipe and receives commands from `inbox`."""

    def __init__(self, endpoint: str, token: str, death_fd: int | None, progress: Progress) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.progress = progress
        self.heartbeat_interval_s = 1.0
        self.orphan_grace_s = 60.0
        self._ctx = zmq.Context.instance()
        self._endpoint = endpoint
        self._token = token
        self._death_fd = death_fd
        self._inproc = f"inproc://worker-out-{id(self)}"
        self._pull = self._ctx.socket(zmq.PAIR)
        self._pull.bind(self._inproc)
        self._push = self._ctx.socket(zmq.PAIR)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(self._inproc)
        self._push_lock = threading.Lock()
        self._orphaned_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="lmx-io", daemon=True)

    def start(self, first: Message) -> None:
        self._first = first
        self._thread.start()

    def send(self, msg: Message) -> None:
        """Called from the main thread."""
        with self._push_lock:
            self._push.send_multipart(codec.encode(msg), copy=False)

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._token.encode())
        sock.setsockopt(zmq.LINGER, 0)
        # Sends never block this thread (a blocked IO thread could never notice it is orphaned);
        # a deep queue keeps a burst of tokens from being dropped while the supervisor catches up.
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        sock.connect(self._endpoint)
        return sock

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            log("worker.io_failed", level="error", error=repr(exc))
            os._exit(WorkerExit.IO_FAILED)

    def _loop(self) -> None:
        sock = self._socket()
        self._send(sock, self._first)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        if self._death_fd is not None:
            poller.register(self._death_fd, zmq.POLLIN)
        last_beat = 0.0
        while True:
            # Recomputed each turn: INIT changes the interval after the first beats went out.
            next_beat = last_beat + self.heartbeat_interval_s
            timeout_ms = max(0.0, next_beat - time.monotonic()) * 1000
            for item, _ in poller.poll(timeout_ms):
                if item is sock:
                    self._receive(sock)
                elif item is self._pull:
                    self._forward(sock)
                elif item == self._death_fd:
                    self._on_parent_gone(poller)
            now = time.monotonic()
            if now >= next_beat:
                self._beat(sock)
                last_beat = now
            if self._orphaned_at is not None and now - self._orphaned_at > self.orphan_grace_s:
                log("worker.orphan_exit", grace_s=self.orphan_grace_s)
                os._exit(WorkerExit.ORPHANED)

    def _receive(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart()
        try:
            msg = codec.decode(frames, TO_WORKER)
        except Exception as exc:
            log("worker.bad_message", error=str(exc))
            return
        if isinstance(msg, Cancel):
            self.progress.cancelled.add(msg.request_id)
        self.inbox.put(msg)

    def _on_parent_gone(self, poller: zmq.Poller) -> None:
        # EOF on the death pipe: the supervisor process is gone (crash, SIGKILL, or exit).
        poller.unregister(self._death_fd)
        os.close(self._death_fd)
        self._death_fd = None
        self._orphaned_at = time.monotonic()
        log("worker.orphaned", grace_s=self.orphan_grace_s)

    def _beat(self, sock: zmq.Socket) -> None:
        try:
            memory = self.progress.memory()
        except Exception:  # memory figures are best effort; the beat itself must go out
            memory = {}
        self._send(sock, Heartbeat(self.progress.count, self.progress.phase, memory))

    def _forward(self, sock: zmq.Socket) -> None:
        frames = self._pull.recv_multipart(copy=False)
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log("worker.send_dropped", level="warning")

    def _send(self, sock: zmq.Socket, msg: Message) -> None:
        try:
            sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no supervisor to hear it; the orphan timer decides what happens next
