"""The worker's IO thread: owns the ZeroMQ socket, heartbeats, and the watch on the supervisor."""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
import time
from typing import Callable

import zmq

from protocol import codec
from protocol.endpoint import worker_identities
from protocol.exitcodes import WorkerExit
import psutil

from protocol.phase import Phase
from protocol.messages import START_TIME_SLACK_S, TO_WORKER, Adopt, Heartbeat, Hello, Init, Message
from worker.log import log



def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Progress:
    """Counters the main thread bumps and the IO thread reads (plain ints: atomic under the GIL)."""

    def __init__(self) -> None:
        self.count = 0
        self.phase: str = Phase.STARTING
        self.cancel_all = False  # orphaned: every client is gone (the batched loop reads this)
        self.revision: str | None = None  # set once the weights are loaded
        self.memory: Callable[[], dict] = dict
        self.cache: Callable[[], dict] = dict  # the prefix cache's figures, once there is one


def _decode(frames: list) -> Message | None:
    """A message from the supervisor, on either socket; None (logged) if it cannot be read."""
    try:
        return codec.decode(frames, TO_WORKER)
    except Exception as exc:
        log("worker.bad_message", error=str(exc))
        return None


class Inbox:
    """What the main thread is sent. Requests and cancels come straight to its own socket (the
    supervisor sends them there because this worker's hello says `direct_requests`): no hop through
    the IO thread, and no wait for it to win the GIL. The rest (init, shutdown, and requests from a
    supervisor that sends everything to the IO thread) comes through the IO thread, which rings a
    pipe, so that one poll waits on both. Only the main thread reads; `put` is the IO thread's."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._queued: collections.deque[Message] = collections.deque()
        self._bell_r, self._bell_w = os.pipe()
        os.set_blocking(self._bell_r, False)
        os.set_blocking(self._bell_w, False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._bell_r, zmq.POLLIN)

    def put(self, msg: Message) -> None:
        """From the IO thread."""
        self._queued.append(msg)
        try:
            os.write(self._bell_w, b"\0")
        except BlockingIOError:
            pass  # rung already and not heard yet: one ring is enough

    def get(self, timeout: float | None = None) -> Message:
        """The next message; queue.Empty once `timeout` seconds pass without one (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._next()
            if msg is not None:
                return msg
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            self._poller.poll(None if remaining is None else remaining * 1000)
            try:
                os.read(self._bell_r, 4096)  # heard: what it rang for is in the deque now
            except BlockingIOError:
                pass

    def poll(self) -> Message | None:
        """The next message if one is here, else None: for the batch loop, between steps (no
        exception, no clock, one EVENTS check)."""
        return self._next()

    def _next(self) -> Message | None:
        if self._queued:
            return self._queued.popleft()
        return self._from_socket()

    def _from_socket(self) -> Message | None:
        sock = self._sock
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            msg = _decode(sock.recv_multipart(zmq.NOBLOCK))
            if msg is not None:
                return msg
        return None


class Channel:
    """Two DEALER sockets to the supervisor. The IO thread's sends the hello and the heartbeats and
    receives the supervisor's commands, so a main thread busy in mlx never delays them. The main
    thread's carries what the main thread makes (ready, chunks, finals, errors) straight to the
    supervisor, and requests and cancels straight from it (`Inbox`): a token's way out costs one
    ZeroMQ send, not a hand-off to a Python thread that must first win the GIL back from the next
    decode step, and a request's way in none either."""

    def __init__(self, endpoint: str, token: str, death_fd: int | None, progress: Progress) -> None:
        self.progress = progress
        self.heartbeat_interval_s = 1.0
        # Until an Init says otherwise. A warm spare has no model and nothing to be adopted for:
        # orphaned, it ends at once rather than hold a process (and mlx's imports) for a minute.
        self.orphan_grace_s = 0.0 if os.environ.get("LMX_WORKER_SPARE") else 60.0
        self._ctx = zmq.Context.instance()
        self._endpoint = endpoint
        self._control_identity, self._data_identity = worker_identities(token)
        self._death_fd = death_fd
        self._data = self._socket(self._data_identity)  # the main thread's alone
        self.inbox = Inbox(self._data)
        self._orphaned_at: float | None = None
        self._supervisor: psutil.Process | None = None  # the adopting supervisor, watched by polling
        self._hello: Hello | None = None
        self._thread = threading.Thread(target=self._run, name="lmx-io", daemon=True)

    def start(self, first: Hello) -> None:
        self._hello = first
        self._thread.start()

    def send(self, msg: Message) -> None:
        """Called from the main thread."""
        self.send_frames(codec.encode(msg))

    def send_frames(self, frames: list[bytes]) -> None:
        """Called from the main thread."""
        try:
            self._data.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log("worker.send_dropped", level="warning")

    def _socket(self, identity: bytes) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
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
        sock = self._socket(self._control_identity)
        assert self._hello is not None
        self._send(sock, self._hello)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
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
                elif item == self._death_fd:
                    self._on_parent_gone(poller)
            now = time.monotonic()
            if now >= next_beat:
                self._check_adopter()
                self._beat(sock)
                last_beat = now
            if self._orphaned_at is not None and now - self._orphaned_at > self.orphan_grace_s:
                log("worker.orphan_exit", grace_s=self.orphan_grace_s)
                os._exit(WorkerExit.ORPHANED)

    def _receive(self, sock: zmq.Socket) -> None:
        msg = _decode(sock.recv_multipart())
        if msg is None:
            return
        if isinstance(msg, Init):
            # Here, not in the main thread: the next poll must already wait for the new interval,
            # not sleep out the old one (heartbeats would pause for up to the old interval).
            self.heartbeat_interval_s = msg.heartbeat_interval_s
            self.orphan_grace_s = msg.orphan_grace_s
        if isinstance(msg, Adopt):
            self._on_adopt(msg)
            return
        self.inbox.put(msg)

    def _on_adopt(self, msg: Adopt) -> None:
        if self._orphaned_at is None:
            return
        try:
            proc = psutil.Process(msg.supervisor_pid)
            if abs(proc.create_time() - msg.supervisor_start_time) > START_TIME_SLACK_S:
                raise psutil.NoSuchProcess(msg.supervisor_pid)
        except psutil.Error:
            log("worker.adopt_refused", level="warning", supervisor_pid=msg.supervisor_pid)
            return
        self._supervisor = proc
        self._orphaned_at = None
        log("worker.adopted", supervisor_pid=msg.supervisor_pid)

    def _check_adopter(self) -> None:
        # An adopting supervisor is not our parent: no death pipe, so poll it once per beat.
        if self._supervisor is not None and not _running(self._supervisor):
            self._supervisor = None
            self._orphan()

    def _on_parent_gone(self, poller: zmq.Poller) -> None:
        # EOF on the death pipe: the supervisor process is gone (crash, SIGKILL, or exit).
        poller.unregister(self._death_fd)
        os.close(self._death_fd)
        self._death_fd = None
        self._orphan()

    def _orphan(self) -> None:
        self._orphaned_at = time.monotonic()
        # Its clients went with the supervisor: stop generating for nobody.
        self.progress.cancel_all = True
        log("worker.orphaned", grace_s=self.orphan_grace_s)

    def _beat(self, sock: zmq.Socket) -> None:
        try:
            memory = self.progress.memory()
        except Exception:  # memory figures are best effort; the beat itself must go out
            memory = {}
        try:
            cache = self.progress.cache()
        except Exception:
            cache = {}
        self._send(sock, Heartbeat(self.progress.count, Phase(self.progress.phase).value, memory, cache))
        if self._orphaned_at is not None and self._hello is not None:
            # Until a new supervisor adopts us (or the grace runs out), keep asking: ZeroMQ
            # reconnects by itself once a supervisor binds the socket again.
            self._send(sock, dataclasses.replace(self._hello, adopt=True, revision=self.progress.revision,
                                                 start_time=psutil.Process().create_time()))

    def _send(self, sock: zmq.Socket, msg: Message) -> None:
        try:
            sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no supervisor to hear it; the orphan timer decides what happens next
