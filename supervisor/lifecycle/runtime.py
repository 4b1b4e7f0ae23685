"""One model's life in the supervisor: its state, its worker, its failures, its canary."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from protocol import errors as E
from protocol.messages import Chunks, ClearPrefixCache, GenerateRequest, Message
from supervisor import logs
from supervisor.admission import kvcache
from supervisor.admission.evidence import Evidence
from supervisor.config import Config, ModelConfig
from supervisor.lifecycle import reducer as lifecycle, states
from supervisor.lifecycle.canary import run_canary
from supervisor.lifecycle.failures import Failures
from supervisor.lifecycle.requests import RequestQueue, Sink
from supervisor.lifecycle.startup import Startup
from supervisor.lifecycle.states import ModelState as S
from supervisor.services import Services
from supervisor.workers import adoption
from supervisor.workers.group import RankGroup
from supervisor.workers.handle import WorkerHandle


class ModelRuntime(Failures):
    def __init__(self, model: ModelConfig, services: Services) -> None:
        self.cfg = model  # the configured section
        self.running = model  # the section that runs (differs after a rollback)
        self.services = services
        self.store = services.store
        self.events, self.metrics = services.events, services.metrics
        self.state = S.UNLOADED
        self.worker: WorkerHandle | RankGroup | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: E.LmxError | None = None
        self.retry_at: float | None = None
        self.ready_since: float | None = None
        self.requests = RequestQueue(model.id, self._send_to_worker, model.max_batch_size, model.max_queue,
                                     ended=self._check_idle)
        self.last_used = 0.0  # monotonic time of the last request: eviction takes the oldest idle
        self.idled_out = False  # unloaded by idle_ttl_s: the next request brings it back
        self.canary: dict[str, Any] | None = None  # the last passing canary's evidence
        self._task: asyncio.Task | None = None
        self._stable: asyncio.TimerHandle | None = None
        self._death_request: str | None = None  # the request its worker was serving when it died
        self.log = logs.get(model=model.id)
        self.cache_totals = kvcache.Totals()  # prefix cache counters across this model's workers
        # Set and replaced on each state change, so a waiter wakes once per change, never polls.
        self._changed = asyncio.Event()
        self._idle: asyncio.Event | None = None  # while draining: set when the last request ends
        self.startup = Startup(self)
        self._restore()

    @property
    def config(self) -> Config:
        return self.services.config  # the current one: a reload replaces it in the services

    # --- state ---------------------------------------------------------------------------------

    def to(self, to: S, reason: str, **fields: Any) -> None:
        fields = {"worker_pid": self.worker.process.pid if self.worker else None, "revision": self.running.revision,
                  **fields}
        previous = self.state
        self.state = states.apply(self.state, to, reason, self.log.info, **fields)
        self.events.publish("model.state", model=self.cfg.id, **{"from": previous.value, "to": to.value},
                            reason=reason, **fields)
        if to in (S.UNLOADED, S.REJECTED, S.QUARANTINED):
            self.services.ledger.release(self.cfg.id)  # no worker will hold memory for it
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Until `done()` holds, re-checked at each state change (the caller bounds the wait)."""
        while not done():
            await self._changed.wait()

    def _restore(self) -> None:
        """Pick up what the store remembers: quarantine, and the revision that was running."""
        self.store.remember_revision(self.cfg)
        flags = self.store.model_flags(self.cfg.id)
        if flags["configured_revision"] != self.cfg.revision:
            if flags["quarantined"]:
                self.log.info("model.quarantine_cleared", reason="config changed")
                self.store.set_quarantine(self.cfg.id, None)
            return
        if flags["running_revision"] and flags["running_revision"] != self.cfg.revision:
            self.running = self.store.revision(self.cfg.id, flags["running_revision"]) or self.cfg
        if flags["quarantined"]:
            q = dict(flags["quarantine"] or {})
            self.last_error = E.ModelQuarantined(q.pop("message", "quarantined"), **q)
            self.log.warning("model.restored", state="QUARANTINED", **q)
            self.to(S.QUARANTINED, "restored from the store", **q)

    def wanted(self) -> bool | None:
        return self.store.model_flags(self.cfg.id)["wanted"]

    def _remember(self, wanted: bool | None) -> None:
        self.store.set_wanted(self.cfg.id, wanted, self.running.revision, self.cfg.revision)

    def retry_after_s(self) -> float:
        return 1.0 if self.retry_at is None else round(max(0.0, self.retry_at - time.monotonic()), 3)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, reason: str, wanted: bool | None = None, force: bool = False) -> bool:
        """Begin bringing the model to READY; False when it is already on its way or there.
        `force`: an operator's word that a combination the registry knows as bad may be tried."""
        effects = self._reduce(lifecycle.StartRequested())
        if not effects:
            return False
        self.idled_out = False
        self.startup.force = force
        self._remember(wanted if wanted is not None else self.wanted())
        for effect in effects:
            self._do(effect, reason)
        return True

    def _spawn_task(self, coro: Any) -> None:
        self._task = asyncio.get_running_loop().create_task(coro, name=f"model-{self.cfg.id}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("internal.task_failed", state=self.state.value, error=repr(exc),
                           exc_info=(type(exc), exc, exc.__traceback__))

    def _evidence(self) -> Evidence:
        return Evidence(self.store, self.cfg.id, self.running.path, self.running.worker_command, self.running.group)

    async def _bring_up(self) -> None:
        if self.state in (S.ADMITTING, S.ROLLING_BACK):  # a rollback's revision is admitted like any
            refusal = await self.startup.admit()
            if refusal is not None:
                await self._refused(refusal)
                return
        else:  # a restart keeps its reservation, but a dead worker's memory must be back first
            await self.services.ledger.settle()
        try:
            await self._go_ready(await self.startup.run())
        except E.LmxError as exc:
            await self._failed(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("internal.start_failed")
            await self._failed(E.InternalError(f"start failed: {exc!r}"))

    async def _go_ready(self, worker: WorkerHandle) -> None:
        """CANARY -> READY once the canary passes; the worker is then recorded for adoption."""
        cfg = self.running
        result = await run_canary(cfg.canary, self.requests, self.log)
        load_s = worker.loaded.load_s if worker.loaded else None
        self.canary = self._evidence().canary_passed(cfg.canary, result, load_s, worker.memory)
        self.retry_at = None
        self.ready_since = time.monotonic()
        self.to(S.READY, "canary passed", canary_tokens=result.usage.get("completion_tokens"))
        p = worker.process
        if cfg.group is None:  # a group's ranks end with their supervisor: nothing to adopt
            self.store.set_worker(self.cfg.id, adoption.worker_record(
                p.pid, p.start_time, p.token, cfg.revision, self.services.worker_endpoint, self.store.boot_id))
        self._stable = asyncio.get_running_loop().call_later(
            self.config.restart.stable_after_s, self._on_stable, worker)

    async def _refused(self, refusal: E.LmxError) -> None:
        self.last_error = refusal
        self.log.warning("model.rejected", code=refusal.code.code, message=refusal.message,
                         file=refusal.details.get("file"), revision=self.running.revision)
        await self._apply(lifecycle.Refused(refusal.code.code, refusal.message, self.running.revision),
                          refusal.code.code, refusal, now=time.time())

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

    def _on_stable(self, worker: WorkerHandle) -> None:
        for effect in self._reduce(lifecycle.Stable(self.worker is worker)):
            self._do(effect, "stable")

    def _reduce(self, event: lifecycle.Event, now: float = 0.0) -> list[lifecycle.Effect]:
        history = self.store.failures(self.cfg.id, now - self.config.restart.window_s) if now else []
        return lifecycle.reduce(self.state, event, history, now, self.config.restart)[1]

    async def _apply(self, event: lifecycle.Event, reason: str, exc: E.LmxError | None = None,
                     record: dict[str, Any] | None = None, now: float = 0.0) -> None:
        """Ask lifecycle.reduce what `event` means in this state, then do it, in order."""
        await self._perform(self._make_durable(self._reduce(event, now)), reason, exc, record)

    async def _perform(self, effects: list[lifecycle.Effect], reason: str, exc: E.LmxError | None = None,
                       record: dict[str, Any] | None = None) -> None:
        for effect in effects:
            if isinstance(effect, lifecycle.RollBack):
                await self.rollback(effect.revision, effect.reason)
            elif isinstance(effect, lifecycle.Drain):
                await self._drain(self.config.supervisor.drain_grace_s)
            elif isinstance(effect, lifecycle.StopWorker):
                await self.stop_worker(reason)
            elif isinstance(effect, lifecycle.BringUp):
                self.retry_at = None
                await self._bring_up()
            elif isinstance(effect, lifecycle.StopFirst):
                await self.stop(reason, remember=False)
            else:
                self._do(effect, reason, exc, record)

    def _do(self, effect: lifecycle.Effect, reason: str, exc: E.LmxError | None = None,
            record: dict[str, Any] | None = None) -> None:
        """The effects that need no waiting (those of a worker's exit, which is a callback)."""
        exc = exc or E.ShuttingDown(f"model stopped: {reason}")
        if isinstance(effect, lifecycle.Go):
            self.to(effect.to, reason, **dict(effect.fields))
        elif isinstance(effect, lifecycle.FailRequests):
            self.requests.fail_all(exc)
        elif isinstance(effect, lifecycle.RecordCrash) and record is not None:
            self._record_crash(record, exc)
        elif isinstance(effect, lifecycle.EnterBackoff):
            self.retry_at = time.monotonic() + effect.delay_s
            self.to(S.BACKOFF, exc.code.code, code=exc.code.code, retry_after_s=round(effect.delay_s, 3),
                    failures_in_window=effect.failures_in_window)
        elif isinstance(effect, lifecycle.Quarantine):
            self._quarantine(exc, effect.summary)
        elif isinstance(effect, lifecycle.ScheduleRestart):
            self._spawn_task(self._restart_after(effect.delay_s))
        elif isinstance(effect, lifecycle.Reject):
            self.to(S.REJECTED, exc.code.code, code=exc.code.code, message=exc.message, file=exc.details.get("file"))
        else:
            self._do_operator(effect, reason)

    def _do_operator(self, effect: lifecycle.Effect, reason: str) -> None:
        """The effects of what an operator asked for, and of a stable worker."""
        if isinstance(effect, lifecycle.Begin):
            self._spawn_task(self._bring_up())
        elif isinstance(effect, lifecycle.RunRevision):
            self.running = self.store.revision(self.cfg.id, effect.revision) or self.running
            self._remember(self.wanted())
        elif isinstance(effect, lifecycle.Forgive):
            self.store.set_quarantine(self.cfg.id, None)
            self.store.clear_failures(self.cfg.id)
            self.consecutive_failures = 0
            self.last_error = None  # the operator fixed the cause; a new failure will say its own
            self.running = self.cfg
            self._remember(True)
            self.startup.force = self.startup.doubt = True  # whatever it was, every file is read again
        elif isinstance(effect, lifecycle.StartForced):
            self.store.set_quarantine(self.cfg.id, None)
            self.start(reason, wanted=True, force=True)
        elif isinstance(effect, lifecycle.RefuseOperation):
            raise E.BadRequest(f"model {self.cfg.id} {effect.message}")
        elif isinstance(effect, lifecycle.MarkStable):
            self.consecutive_failures = 0
            self.store.set_lkg(self.running)
            self.log.info("model.stable", revision=self.running.revision, lkg=True)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._apply(lifecycle.RestartDue(), "restart")

    async def rollback(self, revision: str | None, reason: str) -> str:
        """Run `revision` (default: last-known-good) instead of what runs now. From BACKOFF this is
        the policy's automatic rollback; from any other state an operator's, which also lifts a
        quarantine."""
        target = revision or self.store.model_flags(self.cfg.id)["lkg_revision"]
        if not target or self.store.revision(self.cfg.id, target) is None:
            raise E.BadRequest(f"model {self.cfg.id} has no known revision {target!r}")
        operator = self.state is not S.BACKOFF
        await self._apply(lifecycle.RollbackRequested(target, self.cfg.revision),
                          f"operator rollback to {target}" if operator else reason)
        return self.state.value

    async def release(self) -> str:
        """Operator: leave QUARANTINED (or REJECTED) and try again on the configured revision."""
        await self._apply(lifecycle.ReleaseRequested(), "operator release")
        return self.state.value

    async def stop(self, reason: str, remember: bool = True) -> None:
        """Drain (bounded by drain_grace_s), then stop the worker: ... -> DRAINING -> UNLOADED."""
        if self._task and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        if remember:
            self._remember(False)
        await self._apply(lifecycle.StopRequested(), reason)

    async def _drain(self, grace_s: float) -> None:
        """Until no request is left (each ending calls _check_idle), for at most grace_s."""
        self._idle = asyncio.Event()
        self._check_idle()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        self._idle = None  # a cancelled drain leaves an Event nobody awaits: harmless

    def _check_idle(self) -> None:
        # The request queue calls this whenever requests leave it, however they leave.
        if self._idle is not None and not len(self.requests):
            self._idle.set()

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

    # --- worker events -------------------------------------------------------------------------

    def on_worker_exit(self, worker: WorkerHandle, rc: int | None) -> None:
        if worker is not self.worker:
            return  # a worker already replaced: its exit was seen to when it was
        self.services.ledger.worker_exited(self.cfg.id, worker.process.pid, worker.memory.get("rss_bytes", 0),
                                   worker.available_at_beat)
        effects = self._reduce(lifecycle.WorkerExited(worker.stopping))
        if not effects or worker.death is None:
            return
        exc = worker.death_error()  # its handle classified the death (and failed its handshake with it)
        self._death_request = self.requests.first_active_origin()
        self.store.set_worker(self.cfg.id, None)
        if lifecycle.HandleFailure() in effects:  # its clients hear of it once the failure is stored
            self._spawn_task(self._failed(exc, worker.death))
        else:  # during a start (the canary's request), or a stop: no failure to record here
            self.requests.fail_all(exc)

    def on_worker_result(self, worker: WorkerHandle, msg: Message) -> None:
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
