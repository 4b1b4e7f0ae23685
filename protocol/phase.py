"""What a worker is doing, as its heartbeats say: the one list both sides read (the worker sets it,
the supervisor's liveness verdicts judge stalls by it)."""

from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    STARTING = "starting"  # before the weights load
    LOADING = "loading"
    # A group's rank inside mx.distributed.init, which holds the GIL until every rank has joined:
    # no heartbeat comes meanwhile. load_timeout_s bounds it, and a rank that dies ends the group.
    JOINING = "joining"
    IDLE = "idle"  # nothing to generate: no progress is expected
    PREFILL = "prefill"  # prompt work: progress moves per prefill slice
    DECODE = "decode"  # generating: progress moves per step


# Phases in which a worker must make progress, or be judged stuck.
WORKING = frozenset({Phase.PREFILL, Phase.DECODE})
