"""One model's life in the supervisor: its facts, its worker and its requests. Each event goes
through lifecycle.reduce once; the runtime applies the state it returns through its one to() and
performs the effects, all of them in one match (_perform)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable, assert_never

from protocol import errors as E
from protocol.messages import Chunks, ClearPrefixCache, GenerateRequest, Message
from supervisor import logs
from supervisor.admission import kvcache
from supervisor.admission.evidence import Evidence
from supervisor.config import Config, ModelConfig
from supervisor.lifecycle import states
from supervisor.lifecycle.effects import (
    Adopt, ArmStable, BringUp, CancelTask, Drain, Effect, EndOrphan, FailRequests, FollowUp, ForgetFailures,
    ForgetWorker, Greet, KeepCanary, LiftQuarantine, Load, MarkStable, NoteFailure, PersistQuarantine, Quarantine,
    RecordCrash, RecordFailure, RecordWorker, RefuseOperation, RefuseWith, Reject, Remember, RetryHint, RunCanary,
    RunRevision, ScheduleRestart, Spawn, StopWorker, TakeWorker)
from supervisor.lifecycle.events import (
    Event, ModelFacts, ReleaseRequested, RestartDue, Restored, RollbackRequested, Stable, StartRequested,
    StopRequested, WorkerExited)
from supervisor.lifecycle.failures import crash_record
from supervisor.lifecycle.reducer import reduce
from supervisor.lifecycle.requests import RequestQueue, Sink
from supervisor.lifecycle.startup import Startup
from supervisor.lifecycle.states import ModelState as S
from supervisor.services import Services
from supervisor.workers import adoption
from supervisor.workers.factory import LocalFactory, WorkerFactory
from supervisor.workers.worker import Worker


class ModelRuntime:
    def __init__(self, model: ModelConfig, services: Services, factory: WorkerFactory | None = None) -> None:
        self.cfg = model  # the configured section
        self.running = model  # the section that runs (differs after a rollback)
        self.services = services
        self.store = services.store
        self.events, self.metrics = services.events, services.metrics
        self.state = S.UNLOADED
        self.worker: Worker | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: E.LmxError | None = None
        self.retry_at: float | None = None
        self.ready_since: float | None = None
        self.requests = RequestQueue(model.id, self._send_to_worker, model.max_batch_size, model.max_queue)
        self.last_used = 0.0  # monotonic time of the last request: eviction takes the oldest idle
        self.idled_out = False  # unloaded by idle_ttl_s: the next request brings it back
        self.canary: dict[str, Any] | None = None  # the last passing canary's evidence
        self._force = False  # the last start's: past the registry's verdict (an operator's word)
        self._tasks: set[asyncio.Task] = set()  # the model's own: its way up, a failure, a restart's wait
        self._stable: asyncio.TimerHandle | None = None
        self.log = logs.get(model=model.id)
        self.cache_totals = kvcache.Totals()  # prefix cache counters across this model's workers
        # Set and replaced on each state change, so a waiter wakes once per change, never polls.
        self._changed = asyncio.Event()
        factory = factory or LocalFactory(services, services.spares)
        self.startup = Startup(model.id, self.store, services.ledger, services.evict, lambda: self.config, factory)
        self._restore()

    @property
    def config(self) -> Config:
        return self.services.config  # the current one: a reload replaces it in the services

    # --- state ---------------------------------------------------------------------------------

    def to(self, to: S, reason: str, **fields: Any) -> None:
        """The one place the state changes. Entering a state with no worker releases the model's
        memory reservation: that is part of the change (nobody will hold memory for it)."""
        fields = {"worker_pid": self.worker.process.pid if self.worker else None, "revision": self.running.revision,
                  **fields}
        previous = self.state
        self.state = states.apply(self.state, to, reason, self.log.info, **fields)
        self.events.publish("model.state", model=self.cfg.id, **{"from": previous.value, "to": to.value},
                            reason=reason, **fields)
        if to is S.READY:
            self.ready_since = time.monotonic()
        if to in (S.UNLOADED, S.REJECTED, S.QUARANTINED):
            self.services.ledger.release(self.cfg.id)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Until `done()` holds, re-checked at each state change (the caller bounds the wait)."""
        while not done():
            await self._changed.wait()

    def facts(self) -> ModelFacts:
        now, restart = time.time(), self.config.restart
        return ModelFacts(
            self.state, self.running.revision, self.cfg.revision, self.store.flags(self.cfg.id).lkg_revision,
            self.consecutive_failures, tuple(self.store.failures(self.cfg.id, now - restart.window_s)), now,
            restart, self.config.supervisor.drain_grace_s, restart.stable_after_s, self.running.group is not None,
            self._force, random.getrandbits(32))

    async def _handle(self, event: Event) -> None:
        """One event, one reducer pass: `first`, the state change, then the rest, in order."""
        t = reduce(self.facts(), event)
        for effect in t.first:
            if (pending := self._perform(effect)) is not None:
                await pending
        if t.state is not self.state:
            self.to(t.state, t.reason, **dict(t.fields))
        for effect in t.effects:
            if (pending := self._perform(effect)) is not None:
                await pending

    def _handle_now(self, event: Event) -> None:
        """An event whose effects need no waiting, from code that cannot wait (a timer, a start)."""
        t = reduce(self.facts(), event)
        self._perform_now(t.first)
        if t.state is not self.state:
            self.to(t.state, t.reason, **dict(t.fields))
        self._perform_now(t.effects)

    def _perform_now(self, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            if self._perform(effect) is not None:
                raise RuntimeError(f"{effect} needs waiting: not from a callback")

    def _restore(self) -> None:
        """Pick up what the store remembers: quarantine, and the revision that was running."""
        self.store.remember_revision(self.cfg)
        flags = self.store.flags(self.cfg.id)
        if flags.configured_revision != self.cfg.revision:
            if flags.quarantined:
                self.log.info("model.quarantine_cleared", reason="config changed")
                self.store.set_quarantine(self.cfg.id, None)
            return
        if flags.running_revision and flags.running_revision != self.cfg.revision:
            self.running = self.store.revision(self.cfg.id, flags.running_revision) or self.cfg
        if flags.quarantined:
            summary = dict(flags.quarantine or {})
            self.log.warning("model.restored", state="QUARANTINED", **{k: v for k, v in summary.items()
                                                                       if k != "message"})
            self._handle_now(Restored(summary))

    def wanted(self) -> bool | None:
        return self.store.flags(self.cfg.id).wanted

    def _remember(self, wanted: bool | None) -> None:
        self.store.set_wanted(self.cfg.id, wanted, self.running.revision, self.cfg.revision)

    def retry_after_s(self) -> float:
        return 1.0 if self.retry_at is None else round(max(0.0, self.retry_at - time.monotonic()), 3)

    # --- what an operator (or the daemon) asks for ---------------------------------------------

    def start(self, reason: str, wanted: bool | None = None, force: bool = False) -> bool:
        """Begin bringing the model to READY; False when it is already on its way or there.
        `force`: an operator's word that a combination the registry knows as bad may be tried."""
        before = self.state
        self._handle_now(StartRequested(reason, wanted, force))
        return self.state is not before

    async def stop(self, reason: str, remember: bool = True, idle: bool = False) -> None:
        """Drain (bounded by drain_grace_s), then stop the worker: ... -> DRAINING -> UNLOADED.
        `idle`: unloaded for idleness, so the next request brings it back."""
        if remember:
            self._remember(False)
        await self._handle(StopRequested(reason))
        self.idled_out = idle and self.state is S.UNLOADED

    def repaired(self) -> bool:
        """Its snapshot was repaired: a refusal about it no longer holds, so a REJECTED model
        forgets it and starts again. False when it was not REJECTED."""
        if self.state is not S.REJECTED:
            return False
        self.last_error = None
        return self.start("repaired")

    async def rollback(self, revision: str | None, reason: str) -> str:
        """Run `revision` (default: last-known-good) instead of what runs now. From BACKOFF this is
        the policy's automatic rollback; from any other state an operator's, which also lifts a
        quarantine."""
        target = revision or self.store.flags(self.cfg.id).lkg_revision
        if not target or self.store.revision(self.cfg.id, target) is None:
            raise E.BadRequest(f"model {self.cfg.id} has no known revision {target!r}")
        operator = self.state is not S.BACKOFF
        await self._handle(RollbackRequested(target, f"operator rollback to {target}" if operator else reason))
        return self.state.value

    async def release(self) -> str:
        """Operator: leave QUARANTINED (or REJECTED) and try again on the configured revision."""
        await self._handle(ReleaseRequested())
        return self.state.value

    def clear_prefix_cache(self) -> dict[str, int]:
        """lmxctl cache clear, a barrier: the files go first (a write of the worker's that lands after
        fails: worker.prefixdisk), then the worker forgets its entries and queued writes, told on the
        socket its requests take, so that no request sent after this finds one."""
        state_dir = self.services.state_dir
        try:
            removed = kvcache.clear(state_dir, self.cfg.id) if state_dir is not None else {}
        except kvcache.OutsideCache as exc:  # a link planted in the cache dir: nothing is removed
            raise E.BadRequest(f"cache clear refused: {exc}") from None
        if self.worker is not None:
            self.worker.send(ClearPrefixCache())
        self.log.info("model.prefix_cache_cleared", **removed)
        return removed

    # --- the effects ---------------------------------------------------------------------------

    def _perform(self, e: Effect) -> Awaitable[None] | None:
        """Do one effect; what must be waited for comes back to wait for (the one match of them all)."""
        match e:
            case RecordFailure(failure): self.store.add_failure(self.cfg.id, failure)
            case PersistQuarantine(summary): self.store.set_quarantine(self.cfg.id, summary)
            case BringUp(): self._bring_up(e)
            case Adopt(record): return self._step(self.startup.adopt(record, self.running, self))
            case EndOrphan(record, why): self.startup.end_orphan(record, self.running, why)
            case Spawn(): return self._handle(self.startup.spawn(self.running, self))
            case TakeWorker(worker): self.worker = worker
            case Greet(init): return self._step(self.startup.greet(self._worker(), init))
            case Load(): return self._step(self.startup.load(self._worker()))
            case RunCanary(): return self._step(self.startup.canary(self._worker(), self.running, self.requests))
            case KeepCanary(evidence): self.canary = evidence
            case RecordWorker(): self._record_worker()
            case ArmStable(after_s): self._arm_stable(after_s)
            case RetryHint(delay_s): self.retry_at = None if delay_s is None else time.monotonic() + delay_s
            case Remember(wanted): self._remember(wanted if wanted is not None else self.wanted())
            case RunRevision(revision): self._run_revision(revision)
            case ForgetFailures(): self._forget_failures()
            case LiftQuarantine(): self.store.set_quarantine(self.cfg.id, None)
            case RefuseOperation(message): raise E.BadRequest(f"model {self.cfg.id} {message}")
            case CancelTask(): self._cancel_tasks()
            case Drain(grace_s): return self.requests.drained(grace_s)
            case StopWorker(reason): return self.stop_worker(reason)
            case FailRequests(error): self.requests.fail_all(error)
            case ForgetWorker(): self.store.set_worker(self.cfg.id, None)
            case NoteFailure(error, phase): self._note_failure(error, phase)
            case RecordCrash(): self._record_crash(e)
            case ScheduleRestart(delay_s): self._spawn_task(self._restart_after(delay_s))
            case Quarantine(error, code): self._quarantine(error, code)
            case RefuseWith(error): self.last_error = error
            case Reject(error): self._reject(error)
            case MarkStable(revision): self._mark_stable(revision)
            case FollowUp(event): return self._handle(event)
            case _: assert_never(e)
        return None

    def _worker(self) -> Worker:
        assert self.worker is not None, "a step of the way up with no worker"
        return self.worker

    async def _step(self, step: Awaitable[Event]) -> None:
        await self._handle(await step)

    def _bring_up(self, e: BringUp) -> None:
        """The way up, as the model's task: admission (or a restart's settling), then each step's event."""
        self._force = e.force
        if e.admit:
            self.idled_out = False  # whatever unloaded it, it is wanted up now
        self._spawn_task(self._step(self.startup.admit(self.running, e.force, e.doubt) if e.admit
                                    else self.startup.settle()))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"model-{self.cfg.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("internal.task_failed", state=self.state.value, error=repr(exc),
                           exc_info=(type(exc), exc, exc.__traceback__))

    def _cancel_tasks(self) -> None:
        """Every task of the model's but the one performing this (which goes on to its end)."""
        for task in list(self._tasks):
            if task is not asyncio.current_task() and not task.done():
                task.cancel()

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._handle(RestartDue())

    def _evidence(self) -> Evidence:
        return Evidence(self.store, self.cfg.id, self.running.path, self.running.worker_command, self.running.group)

    def _record_worker(self) -> None:
        p = self._worker().process
        self.store.set_worker(self.cfg.id, adoption.worker_record(
            p.pid, p.start_time, p.token, self.running.revision, self.services.worker_endpoint, self.store.boot_id))

    def _arm_stable(self, after_s: float) -> None:
        worker = self.worker
        self._stable = asyncio.get_running_loop().call_later(
            after_s, lambda: self._handle_now(Stable(self.worker is worker)))

    def _mark_stable(self, revision: str) -> None:
        self.consecutive_failures = 0
        self.store.set_lkg(self.running)
        self.log.info("model.stable", revision=revision, lkg=True)

    def _run_revision(self, revision: str) -> None:
        configured = revision == self.cfg.revision
        self.running = self.cfg if configured else self.store.revision(self.cfg.id, revision) or self.running

    def _forget_failures(self) -> None:
        self.store.set_quarantine(self.cfg.id, None)
        self.store.clear_failures(self.cfg.id)
        self.consecutive_failures = 0
        self.last_error = None  # the operator fixed the cause; a new failure will say its own

    def _note_failure(self, error: E.LmxError, phase: str) -> None:
        self.last_error = error
        self.restarts += 1
        self.metrics.restarts.labels(self.cfg.id).inc()
        self.consecutive_failures += 1
        self.log.warning("model.failed", code=error.code.code, message=error.message, phase=phase, **error.details)

    def _record_crash(self, e: RecordCrash) -> None:
        record = crash_record(self.cfg.id, self.running.revision, e)
        self.store.add_crash(record)
        self.metrics.failed(self.cfg.id, e.error.code.code, record)
        self.events.publish("model.failed", **record.event_fields())
        self._evidence().failure(record)  # the registry takes only what is about compatibility

    def _quarantine(self, error: E.LmxError, code: str) -> None:
        self.retry_at = None
        self.last_error = error
        self.log.error("model.quarantined", code=code, message=error.message,
                       hint=f"lmxctl history {self.cfg.id}; after fixing the cause: lmxctl release {self.cfg.id}")

    def _reject(self, error: E.LmxError) -> None:
        self.last_error = error
        self.log.warning("model.rejected", code=error.code.code, message=error.message,
                         file=error.details.get("file"), revision=self.running.revision)

    async def stop_worker(self, reason: str) -> None:
        worker = self.worker
        if worker is None:
            return
        if self._stable is not None:
            self._stable.cancel()
        await worker.close(reason, self.config.supervisor.stop_timeout_s)
        self.store.set_worker(self.cfg.id, None)
        if self.worker is worker:
            self.worker = None
            self.ready_since = None

    # --- the worker's callbacks (supervisor.workers.worker.Owner) -----------------------------

    def on_worker_exit(self, worker: Worker, rc: int | None) -> None:
        if worker is not self.worker:
            return  # a worker already replaced: its exit was seen to when it was
        self.services.ledger.worker_exited(self.cfg.id, worker.process.pid, worker.memory.get("rss_bytes", 0),
                                           worker.available_at_beat)
        if worker.stopping or worker.death is None:
            return  # asked to stop: its exit is no failure
        event = WorkerExited(worker, worker.death, worker.death.error(), self.requests.first_active_origin())
        self._spawn_task(self._handle(event))

    def on_worker_result(self, worker: Worker, msg: Message) -> None:
        if worker is self.worker:  # the queue matches results to requests by id, and drops the rest
            for result in msg.chunks() if isinstance(msg, Chunks) else (msg,):
                self.requests.on_result(result)

    # --- requests ------------------------------------------------------------------------------

    def _send_to_worker(self, msg: Message) -> bool:
        return self.worker is not None and self.worker.send(msg)

    def submit(self, req: GenerateRequest, sink: Sink) -> str:
        """Queue a client request; raises the typed refusal when the model is not routable."""
        if self.state is S.READY:
            self.last_used = time.monotonic()
            return self.requests.add(req, sink)
        if self.state is S.UNLOADED and self.idled_out:  # unloaded for idleness: a request loads it
            self.start("request for a model unloaded for idleness", wanted=True)
            raise E.ModelNotReady(f"model {self.cfg.id} was unloaded for idleness and is loading",
                                  state=self.state.value, retry_after_s=self.retry_after_s())
        if self.state in (S.QUARANTINED, S.REJECTED) and self.last_error is not None:
            raise self.last_error  # the refusal itself, naming the file or the failure summary
        if self.state in states.PENDING_STATES:
            raise E.ModelNotReady(f"model {self.cfg.id} is {self.state.value}",
                                  state=self.state.value, retry_after_s=self.retry_after_s())
        err = self.last_error
        raise E.ModelNotReady(f"model {self.cfg.id} is {self.state.value}"
                              + (f" (last error {err.code.code}: {err.message})" if err else ""),
                              state=self.state.value)

    def cancel(self, wrid: str) -> None:
        self.requests.cancel(wrid)
