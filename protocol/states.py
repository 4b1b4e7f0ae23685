"""The model states every reader shares (client, lmxctl, gateway, daemon): the enum and its named
groups. The transition table and the one function that applies it stay with the daemon
(supervisor/states.py); status carries a state as its `.value` string."""

from __future__ import annotations

import enum


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


def is_state(value: object, *states: ModelState) -> bool:
    """Whether a status's `state` string is one of `states`; a state this reader does not know (a
    newer supervisor's) is none of them, never an error."""
    return any(value == s.value for s in states)
