"""The model state machine (BRIEF §3): the enum, its groups, the transition table, one apply()."""

from __future__ import annotations

import enum
from typing import Any, Callable


class ModelState(enum.Enum):
    UNLOADED = "UNLOADED"
    ADMITTING = "ADMITTING"
    REJECTED = "REJECTED"
    STARTING = "STARTING"
    LOADING = "LOADING"
    CANARY = "CANARY"
    READY = "READY"
    DRAINING = "DRAINING"
    BACKOFF = "BACKOFF"
    ROLLING_BACK = "ROLLING_BACK"
    QUARANTINED = "QUARANTINED"


S = ModelState

# States in which a worker process exists (or is being made) for the model.
WORKER_STATES = frozenset({S.STARTING, S.LOADING, S.CANARY, S.READY, S.DRAINING})
# States that will reach READY by themselves: requests get MODEL_NOT_READY with retry_after_s.
PENDING_STATES = frozenset({S.ADMITTING, S.STARTING, S.LOADING, S.CANARY, S.BACKOFF, S.ROLLING_BACK})
ROUTABLE_STATES = frozenset({S.READY})

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.UNLOADED: frozenset({S.ADMITTING}),
    S.ADMITTING: frozenset({S.STARTING, S.REJECTED, S.UNLOADED}),  # -> UNLOADED: unload while admitting
    S.REJECTED: frozenset({S.ADMITTING, S.UNLOADED}),  # operator retry or config change
    # STARTING -> CANARY: an adopted worker has its weights loaded already; it only re-proves itself.
    S.STARTING: frozenset({S.LOADING, S.CANARY, S.BACKOFF, S.DRAINING}),
    S.LOADING: frozenset({S.CANARY, S.BACKOFF, S.DRAINING}),
    S.CANARY: frozenset({S.READY, S.BACKOFF, S.DRAINING}),
    S.READY: frozenset({S.DRAINING, S.BACKOFF}),
    S.DRAINING: frozenset({S.UNLOADED}),
    S.BACKOFF: frozenset({S.STARTING, S.ROLLING_BACK, S.QUARANTINED, S.UNLOADED}),
    S.ROLLING_BACK: frozenset({S.STARTING, S.QUARANTINED, S.UNLOADED}),
    S.QUARANTINED: frozenset({S.ADMITTING, S.UNLOADED}),  # lmxctl release, or a changed config
}


class IllegalTransition(RuntimeError):
    pass


def check(current: ModelState, to: ModelState) -> None:
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {to.value} is not in the transition table")


def apply(
    current: ModelState, to: ModelState, reason: str, log: Callable[..., Any], **fields: Any
) -> ModelState:
    """The one way a model changes state: checked against the table, logged as `model.state`."""
    check(current, to)
    log("model.state", **{"from": current.value, "to": to.value, "reason": reason}, **fields)
    return to
