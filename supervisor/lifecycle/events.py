"""What the lifecycle reducer reads: the model's facts (one frozen record) and the events that happen
to it, from an operator, a timer, the way up (startup.py returns these) or its worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from protocol import errors as E
from protocol.messages import Final, Init
from supervisor.config import RestartSettings
from supervisor.lifecycle.states import ModelState
from supervisor.persistence.records import Failure, WorkerRecord

if TYPE_CHECKING:
    from supervisor.workers.worker import Death, Worker


@dataclass(frozen=True)
class ModelFacts:
    """What a decision about the model reads: its state, and what it has been through."""
    state: ModelState
    revision: str  # the revision that runs (differs from the configured one after a rollback)
    configured_revision: str
    lkg_revision: str | None
    consecutive_failures: int  # since the model was last stable, or forgiven
    history: tuple[Failure, ...]  # the failures in the restart window, not yet this event's
    now: float  # wall-clock seconds: the failure ledger outlives the process
    restart: RestartSettings
    drain_grace_s: float
    stable_after_s: float
    group: bool  # it runs as a group of ranks (none of them is adopted after a restart)
    force: bool  # the last start's: an operator's word that the registry's verdict may be overridden
    seed: int = 0  # the backoff's jitter comes from random.Random(seed): drawn by the runtime, not here


# --- what an operator (or the daemon on its behalf) asks for --------------------------------------


@dataclass(frozen=True)
class StartRequested:
    """An operator's load, autoload, a reload, a request for a model unloaded for idleness."""
    reason: str
    wanted: bool | None = None  # the operator's word to remember (None: keep what is remembered)
    force: bool = False  # a combination the registry knows as bad may be tried


@dataclass(frozen=True)
class StopRequested:
    """An operator's unload, an idle timeout, a reload or the supervisor's drain."""
    reason: str


@dataclass(frozen=True)
class Restored:
    """The store remembers a quarantine of this configuration, from a previous run."""
    summary: dict[str, Any]


@dataclass(frozen=True)
class ReleaseRequested:
    """An operator's release: leave QUARANTINED or REJECTED and try the configured revision again."""


@dataclass(frozen=True)
class RollbackRequested:
    """Run another known revision: from BACKOFF the policy's own rollback, else an operator's (which
    also lifts a quarantine)."""
    revision: str
    reason: str


# --- the way up (each is what one step of startup.py returned) -------------------------------------


@dataclass(frozen=True)
class AdmissionPassed:
    """The revision may run: admission said yes (or a restart kept its reservation). `adopt`: the
    record of a previous run's worker serving this revision, which is adopted instead of a spawn."""
    adopt: WorkerRecord | None = None


@dataclass(frozen=True)
class Refused:
    """Admission refused the revision to run (the registry, integrity, or memory said no)."""
    error: E.LmxError


@dataclass(frozen=True)
class Adopted:
    """The previous run's worker proved it is the recorded one: its weights are loaded already."""
    worker: "Worker"


@dataclass(frozen=True)
class AdoptionFailed:
    """No adoption after all (the process is gone, or its hello did not prove it): no failure of the
    model's, the supervisor went away, not the model. A new worker is spawned."""
    why: str


@dataclass(frozen=True)
class Spawned:
    """A worker for the model exists (a new process, a warm spare, or a group's ranks placed)."""
    worker: "Worker"
    init: Init  # what makes it the model's (a group's ranks were placed with it already)


@dataclass(frozen=True)
class HelloReceived:
    """The worker (every rank) said hello and was given its Init."""


@dataclass(frozen=True)
class Loaded:
    """The worker (every rank) loaded its weights."""


@dataclass(frozen=True)
class CanaryPassed:
    result: Final
    evidence: dict[str, Any]  # what the registry recorded of it (status shows it)


@dataclass(frozen=True)
class StartFailed:
    """A step of the way up failed (a timeout, an error the worker sent, the canary, a group's rank);
    `death`: the worker's, when it had died by then."""
    error: E.LmxError
    worker: "Worker | None"
    death: "Death | None" = None


# --- the worker and the timers ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerExited:
    """The model's own worker died unasked (one already replaced, or asked to stop, is no event).
    `error`: what the death means to its requests (the death's, unless the worker said why first);
    `request_id`: what it was serving, for the crash record."""
    worker: "Worker"
    death: "Death"
    error: E.LmxError
    request_id: str | None


@dataclass(frozen=True)
class Stopped:
    """A stop's drain is over and its worker is stopped."""
    reason: str


@dataclass(frozen=True)
class RestartDue:
    """The backoff delay has passed."""


@dataclass(frozen=True)
class Stable:
    """READY for stable_after_s (as the timer set at READY sees it)."""
    current: bool  # the worker that became READY is still the model's


@dataclass(frozen=True)
class Quarantined:
    """The policy's verdict, once the failure that reached it has been handled: an operator decides."""
    summary: dict[str, Any]  # failures, window_s, last_code, revision, message: what the store keeps
    code: str


Event = Union[StartRequested, StopRequested, Restored, ReleaseRequested, RollbackRequested, AdmissionPassed, Refused,
              Adopted, AdoptionFailed, Spawned, HelloReceived, Loaded, CanaryPassed, StartFailed, WorkerExited,
              Stopped, RestartDue, Stable, Quarantined]
