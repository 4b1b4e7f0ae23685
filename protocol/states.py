"""The model states every reader shares (client, lmxctl, gateway, daemon): the enum, its named
groups and one model's status. The transition table and the one function that applies it stay with the daemon
(supervisor/lifecycle/states.py); status carries a state as its `.value` string."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional


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


@dataclasses.dataclass
class ModelStatus:
    """One model's entry in status, as `StatusReply.models` carries it (a map with exactly these
    keys: the LMX server and `lmxctl status --json` read them; tests/test_admin_wire.py pins them)."""

    id: str
    state: str  # a ModelState value
    autoload: bool
    pinned: bool
    idled_out: bool
    wanted: Optional[bool]  # the operator's last load/unload (None: as the config says)
    revision: str
    configured_revision: Optional[str]
    lkg_revision: Optional[str]
    worker_pid: Optional[int]
    restarts: int
    failures_in_window: int
    last_error: Optional[dict]  # {code, message}
    quarantined: bool
    retry_after_s: Optional[float]
    ready_for_s: Optional[float]
    queued: int
    active: int
    phase: Optional[str]
    memory: dict
    prefix_cache: dict
    canary: Any
    # A group's ranks (docs/distributed.md): [{rank, host, address, pid, state, memory}]; None for
    # a model served by one worker. Optional on the wire: a supervisor from before groups omits it.
    group: Optional[list] = None
    # What it serves (supervisor.kinds: "generate", "embed"); a supervisor from before kinds omits
    # it, and every model was then "generate".
    kind: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelStatus":
        """Exactly these keys, or a KeyError/TypeError naming the difference: the daemon and the
        wire cannot drift apart unnoticed."""
        names = [f.name for f in dataclasses.fields(cls)]
        d = {"group": None, "kind": None, **d}
        if set(d) != set(names):
            raise KeyError(f"model status keys differ: extra {sorted(set(d) - set(names))}, "
                           f"missing {sorted(set(names) - set(d))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def model_state(self) -> Optional[ModelState]:
        """The state as the enum; None for a state this reader does not know (a newer supervisor's)."""
        try:
            return ModelState(self.state)
        except ValueError:
            return None
