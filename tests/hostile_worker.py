"""Test-only worker wrapper, named in a model's `worker_command`: the real worker, plus a thread that
puts garbage on the worker's own socket (so under its real identity token) once a trigger file
appears; the file says which garbage. It is removed first, so the restarted worker behaves."""

from __future__ import annotations

import argparse
import os
import threading
import time

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
_instances: list = []
_init = channel.Channel.__init__


def _record(self, *a, **kw):  # type: ignore[no-untyped-def]
    _init(self, *a, **kw)
    _instances.append(self)


channel.Channel.__init__ = _record


def _watch() -> None:
    while True:
        time.sleep(0.05)
        if _instances and os.path.exists(args.trigger):
            with open(args.trigger) as f:
                kind = f.read().strip()
            os.unlink(args.trigger)
            ch = _instances[0]
            ch.send_frames(GARBAGE.get(kind, GARBAGE["msgpack"]))  # as they are, on its data socket


threading.Thread(target=_watch, daemon=True).start()

from worker.main import main  # noqa: E402

raise SystemExit(main())
