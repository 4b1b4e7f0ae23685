"""What the lifecycle reducer decides: a `Transition` (the state to be in, the reason its model.state
event gives, and the effects to perform), each effect a frozen value carrying all of its data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from protocol import errors as E
from protocol.messages import Init
from supervisor.lifecycle.events import Event
from supervisor.lifecycle.states import ModelState
from supervisor.persistence.records import Failure, WorkerRecord

if TYPE_CHECKING:
    from supervisor.workers.worker import Death, Worker

# --- the safety records: written first (docs/security.md: durable before observable) --------------


@dataclass(frozen=True)
class RecordFailure:
    failure: Failure


@dataclass(frozen=True)
class PersistQuarantine:
    summary: dict[str, Any]  # what the store keeps and status reports

# --- the way up -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BringUp:
    """Bring the model up as its task: admission first (`admit`; a restart instead waits for its dead
    worker's memory to be back, keeping its reservation), then the worker."""
    admit: bool
    force: bool  # past the registry's verdict (an operator's word)
    doubt: bool = False  # read every file again: no cached hash is trusted


@dataclass(frozen=True)
class Adopt:
    record: WorkerRecord  # the previous run's worker, as the store recorded it


@dataclass(frozen=True)
class EndOrphan:
    """A previous run's worker nobody will adopt: ended (if it is still the recorded process)."""
    record: WorkerRecord
    why: str


@dataclass(frozen=True)
class Spawn:
    """A new worker: a warm spare, a new process, or a group's ranks."""


@dataclass(frozen=True)
class TakeWorker:
    """This worker is the model's now: its results and its exit are heard."""
    worker: "Worker"


@dataclass(frozen=True)
class Greet:
    """Its hello, then its Init."""
    init: Init


@dataclass(frozen=True)
class Load:
    """Its ready: weights loaded."""


@dataclass(frozen=True)
class RunCanary:
    pass


@dataclass(frozen=True)
class KeepCanary:
    """The passing canary's evidence (the registry has it already), for status."""
    evidence: dict[str, Any]


@dataclass(frozen=True)
class RecordWorker:
    """The serving worker goes on record, so that the next supervisor run can adopt it."""


@dataclass(frozen=True)
class ArmStable:
    """Stable after this long READY (then MarkStable)."""
    after_s: float


@dataclass(frozen=True)
class RetryHint:
    """What a refused request is told to wait (None: the default, one second)."""
    delay_s: float | None


# --- what an operator's word changes ---------------------------------------------------------------


@dataclass(frozen=True)
class Remember:
    """The operator's word (None: what is remembered stays), with the revisions that run."""
    wanted: bool | None


@dataclass(frozen=True)
class RunRevision:
    """Run this revision from now on (a rollback's, or the configured one again)."""
    revision: str


@dataclass(frozen=True)
class ForgetFailures:
    """The operator fixed the cause: the failure ledger, the quarantine, the count and the last
    error go; a new failure will say its own."""


@dataclass(frozen=True)
class LiftQuarantine:
    pass


@dataclass(frozen=True)
class RefuseOperation:
    """The operation makes no sense in this state: the operator gets BAD_REQUEST with this."""
    message: str


# --- stopping and failing --------------------------------------------------------------------------


@dataclass(frozen=True)
class CancelTask:
    """The model's task (a way up, a restart's wait) is overtaken: a stop, or its worker's death."""


@dataclass(frozen=True)
class Drain:
    """Wait, at most grace_s, for the requests in flight."""
    grace_s: float


@dataclass(frozen=True)
class StopWorker:
    reason: str


@dataclass(frozen=True)
class FailRequests:
    error: E.LmxError


@dataclass(frozen=True)
class ForgetWorker:
    """The worker is off the record (a dead one cannot be adopted)."""


@dataclass(frozen=True)
class NoteFailure:
    """Count the failure, keep its error for status and the requests that come, log model.failed."""
    error: E.LmxError
    phase: str  # the state it failed in


@dataclass(frozen=True)
class RecordCrash:
    """The crash record: the failure, its cause, the request the worker was serving, and what the
    worker last showed (its pid, memory, stderr); to the store, metrics, the events and the registry."""
    at: float
    error: E.LmxError
    phase: str
    worker: "Worker | None"
    death: "Death | None"
    request_id: str | None


@dataclass(frozen=True)
class ScheduleRestart:
    delay_s: float


@dataclass(frozen=True)
class Quarantine:
    """An operator decides now: the error every request gets until then."""
    error: E.LmxError
    code: str  # the last failure's


@dataclass(frozen=True)
class RefuseWith:
    """The error every request gets until an operator acts (a quarantine restored from the store)."""
    error: E.LmxError


@dataclass(frozen=True)
class Reject:
    """Admission said no: the refusal every request gets until an operator (or a config) changes it."""
    error: E.LmxError


@dataclass(frozen=True)
class MarkStable:
    """The backoff resets and this revision becomes last-known-good."""
    revision: str


@dataclass(frozen=True)
class FollowUp:
    """An event of the reducer's own, reduced once this transition is performed (each event is one
    state change: a failure goes to BACKOFF, then its verdict moves it on)."""
    event: Event


Effect = Union[RecordFailure, PersistQuarantine, BringUp, Adopt, EndOrphan, Spawn, TakeWorker, Greet, Load, RunCanary,
               KeepCanary, RecordWorker, ArmStable, RetryHint, Remember, RunRevision, ForgetFailures,
               LiftQuarantine, RefuseOperation, CancelTask, Drain, StopWorker, FailRequests, ForgetWorker,
               NoteFailure, RecordCrash, ScheduleRestart, Quarantine, RefuseWith, Reject, MarkStable, FollowUp]


@dataclass(frozen=True)
class Transition:
    """The state to be in after an event, why (the model.state event's reason and extra fields, used
    when the state changes), and the effects, in order: `first` before the state changes (what must
    be written, or done, before anyone can see the new state), then `effects`. An effect that leads
    to a further event (a step of the way up, a FollowUp) comes last: that event's own transition
    follows this one."""
    state: ModelState
    first: tuple[Effect, ...] = ()
    effects: tuple[Effect, ...] = ()
    reason: str = ""
    fields: tuple[tuple[str, Any], ...] = ()
