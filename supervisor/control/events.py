"""Lifecycle events on a PUB socket in the state dir: every state change (admission refusals,
quarantine and rollback are state changes with their code and reason), every crash record, evictions,
memory that did not come back, and the supervisor's own start, drain and stop. `lmxctl events`
follows them; the client library exposes them (the LMX server turns them into server-sent events)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import zmq

from protocol import codec

# A subscriber that stops reading loses events past this many, never stalls the supervisor.
SNDHWM = 10_000


class EventPublisher:
    def __init__(self, ctx: zmq.Context, endpoint: str, socket_path: Path, counter: Any = None) -> None:
        self._sock = ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self._sock.bind(endpoint)
        os.chmod(socket_path, 0o600)
        self.seq = 0
        self._counter = counter  # lmx_events{event}: counted here, where every event passes

    def publish(self, name: str, **fields: Any) -> None:
        """Never blocks and never raises: events are a view of what the log records."""
        self.seq += 1
        if self._counter is not None:
            self._counter.labels(name).inc()
        body = {"ts": time.time(), "seq": self.seq, **fields}
        try:
            self._sock.send_multipart(codec.encode_event(name, body), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self._sock.close(linger=0)
