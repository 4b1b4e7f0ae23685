"""The model state machine (BRIEF §3): the transition table and the one apply() that moves a model."""

from __future__ import annotations

from typing import Any, Callable

# The enum and its groups are the wire's (protocol/states.py); the table and apply() are the daemon's.
from protocol.states import PENDING_STATES, ROUTABLE_STATES, WORKER_STATES, ModelState

__all__ = ["ModelState", "PENDING_STATES", "ROUTABLE_STATES", "WORKER_STATES", "TRANSITIONS", "apply", "check"]

S = ModelState

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.UNLOADED: frozenset({S.ADMITTING, S.QUARANTINED}),  # -> QUARANTINED: restored from the store at start
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
