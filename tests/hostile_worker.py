"""Test-only worker wrapper, named in a model's `worker_command`: the real worker, whose main thread
puts garbage on its own socket (so under its real identity token) once a trigger file appears; the
file says which garbage. It is removed first, so the restarted worker behaves."""

from __future__ import annotations

import argparse
import os
import queue
import time

import zmq

import worker.channel as channel

parser = argparse.ArgumentParser()
parser.add_argument("--trigger", required=True,
                    help="once this file exists, send the garbage it names: msgpack (undecodable), type (a "
                         "wrong field type) or bounds (an out-of-bounds value)")
args = parser.parse_args()

GARBAGE = {
    "msgpack": [b"LMX/1", b"\xc1\xc1 not msgpack"],
    # A heartbeat whose memory figures are strings: would break the watchdog's arithmetic.
    "type": [b"LMX/1", b"\x92\xa9heartbeat\x83\xa8progress\x01\xa5phase\xa4idle\xa6memory\x81\xa9rss_bytes\xa3lot"],
    # A heartbeat with a negative progress counter.
    "bounds": [b"LMX/1", b"\x92\xa9heartbeat\x83\xa8progress\xff\xa5phase\xa4idle\xa6memory\x80"],
}
_get = channel.Inbox.get


def _get_watching(self, timeout=None):  # type: ignore[no-untyped-def]
    """The main thread waits in slices and looks for the trigger between them: the garbage goes out
    on the main thread's own socket, from the main thread (a ZeroMQ socket is one thread's)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
        try:
            return _get(self, step)
        except queue.Empty:
            if os.path.exists(args.trigger):
                with open(args.trigger) as f:
                    kind = f.read().strip()
                os.unlink(args.trigger)
                self._sock.send_multipart(GARBAGE.get(kind, GARBAGE["msgpack"]), zmq.NOBLOCK)  # as they are
            if deadline is not None and time.monotonic() >= deadline:
                raise


channel.Inbox.get = _get_watching

from worker.main import main  # noqa: E402

raise SystemExit(main())
