"""A ZeroMQ socket read from an asyncio loop's reader callback. zmq.asyncio gives every receive a
future and a task wake-up; on a stream of small messages that is most of the Python work per
message. Here the socket's fd is a loop reader and the callback hands each message to a plain
function.

ZeroMQ's fd is edge-triggered and only says that something changed: what is readable is in
EVENTS. So the callback reads until EVENTS says there is nothing left (a bounded number at a time,
then it lets the loop run and comes back), and the owner calls after_send() after each send on the
socket, since a send can consume the edge of a message that arrived meanwhile."""

from __future__ import annotations

import asyncio
from typing import Callable

import zmq
import zmq.asyncio

BUDGET = 256  # messages handled per turn of the loop before others get theirs


class LoopReader:
    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list], None], copy: bool = True) -> None:
        self.sock = sock
        self._on_frames = on_frames
        self._copy = copy
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = True  # the first drain, below
        # Set if reading itself fails (the handler's own errors are its business): whoever owns
        # the socket awaits this, so a socket nobody reads any more is an error, not a silence.
        self.failed: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)  # whatever came before the reader was added

    def after_send(self) -> None:
        if not self._scheduled and not self.sock.closed and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        try:
            for _ in range(BUDGET):
                if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                self._on_frames(sock.recv_multipart(zmq.NOBLOCK, copy=self._copy))
            self._scheduled = True
            self._loop.call_soon(self._drain)
        except Exception as exc:
            self.close()
            if not self.failed.done():
                self.failed.set_exception(exc)

    def close(self) -> None:
        """Stop reading (before the socket is closed)."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None


def monitor_socket(sock: zmq.Socket, ctx: zmq.asyncio.Context, events: int) -> zmq.asyncio.Socket:
    """The monitor of a socket read this way. Its events are read by a task, so unlike the socket
    it lives on the asyncio context (zmq's own get_monitor_socket would make it a plain one)."""
    addr = f"inproc://lmx-monitor.{id(sock)}.{sock.getsockopt(zmq.FD)}"
    sock.monitor(addr, events)
    monitor = ctx.socket(zmq.PAIR)
    monitor.connect(addr)
    return monitor
