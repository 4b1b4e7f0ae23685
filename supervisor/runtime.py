"""One model's life in the supervisor: its state, its worker, its failures, its canary."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol import errors as E
from protocol.messages import (
    Chunk, Chunks, ClearPrefixCache, Error, Final, GenerateRequest, Init, Message, Shutdown,
)
from supervisor import admission, adoption, kvcache, lifecycle, logs, modelrepair, policy, states
from supervisor.canary import run_canary
from supervisor.classify import Verdict, classify
from supervisor.config import Config, ModelConfig
from supervisor.events import EventPublisher, NoEvents
from supervisor.evidence import Evidence
from supervisor.handle import Worker, wait_for
from supervisor.hub import WorkerHub
from supervisor.memory import MemoryLedger
from supervisor.metrics import Metrics
from supervisor.process import AdoptionRefused, WorkerProcess
from supervisor.requests import RequestQueue, Sink
from supervisor.spares import SparePool
from supervisor.states import ModelState as S
from supervisor.store import Store

HELLO_TIMEOUT_S = 60.0


class ModelRuntime:
    def __init__(self, model: ModelConfig, config: Config, hub: WorkerHub, worker_endpoint: str,
                 store: Store, log_dir: Path | None = None, ledger: MemoryLedger | None = None,
                 evict: Callable[[str, int], Awaitable[bool]] | None = None) -> None:
        self.cfg = model  # the configured section
        self.running = model  # the section that runs (differs after a rollback)
        self.config = config
        self.store = store
        self.state = S.UNLOADED
        self.worker: Worker | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: E.LmxError | None = None
        self.retry_at: float | None = None
        self.ready_since: float | None = None
        self.requests = RequestQueue(model.id, self._send_to_worker, model.max_batch_size, model.max_queue)
        self._hub = hub
        self._endpoint = worker_endpoint
        self._log_dir = log_dir
        # A worker of a previous supervisor run, still inside its orphan grace: adopted on start.
        self._orphan: dict[str, Any] | None = store.worker(model.id)
        self._force = False
        self._doubt = False  # an operator's release: the next admission trusts no cached hash
        self._ledger = ledger or MemoryLedger(2**62)
        self._evict = evict
        self.last_used = 0.0  # monotonic time of the last request: eviction takes the oldest idle
        self.idled_out = False  # unloaded by idle_ttl_s: the next request brings it back
        self.canary: dict[str, Any] | None = None  # the last passing canary's evidence
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._stable: asyncio.TimerHandle | None = None
        self.log = logs.get(model=model.id)
        self.events: EventPublisher | NoEvents = NoEvents()  # the daemon gives us its own
        self.metrics = Metrics()
        self.cache_totals = kvcache.Totals()  # prefix cache counters across this model's workers
        self.spares: SparePool | None = None  # the daemon's warm spares, when configured
        # Set and replaced on each state change, so a waiter wakes once per change, never polls.
        self._changed = asyncio.Event()
        self._idle: asyncio.Event | None = None  # while draining: set when the last request ends
        self._restore()

    # --- state ---------------------------------------------------------------------------------

    def _to(self, to: S, reason: str, **fields: Any) -> None:
        pid = self.worker.process.pid if self.worker else None
        fields = {"worker_pid": pid, "revision": self.running.revision, **fields}
        previous = self.state
        self.state = states.apply(self.state, to, reason, self.log.info, **fields)
        self.events.publish("model.state", model=self.cfg.id, **{"from": previous.value, "to": to.value},
                            reason=reason, **fields)
        if to in (S.UNLOADED, S.REJECTED, S.QUARANTINED):
            self._ledger.release(self.cfg.id)  # no worker will hold memory for it
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
            self._to(S.QUARANTINED, "restored from the store", **q)

    def wanted(self) -> bool | None:
        return self.store.model_flags(self.cfg.id)["wanted"]

    def _remember(self, wanted: bool | None) -> None:
        self.store.set_wanted(self.cfg.id, wanted, self.running.revision, self.cfg.revision)

    def retry_after_s(self) -> float:
        if self.retry_at is not None:
            return round(max(0.0, self.retry_at - time.monotonic()), 3)
        return 1.0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, reason: str, wanted: bool | None = None, force: bool = False) -> bool:
        """Begin bringing the model to READY; False when it is already on its way or there.
        `force`: an operator's word that a combination the registry knows as bad may be tried."""
        if self.state not in (S.UNLOADED, S.REJECTED):
            return False
        self.idled_out = False
        self._force = force
        self._remember(wanted if wanted is not None else self.wanted())
        self._to(S.ADMITTING, reason)
        self._spawn_task(self._bring_up())
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
        return Evidence(self.store, self.cfg.id, self.running.path, self.running.worker_command)

    async def _bring_up(self) -> None:
        if self.state in (S.ADMITTING, S.ROLLING_BACK):  # a rollback's revision is admitted like any
            refusal = await self._admit()
            if refusal is not None:
                await self._refused(refusal)
                return
        else:  # a restart keeps its reservation, but a dead worker's memory must be back first
            await self._ledger.settle()
        try:
            await self._start_worker()
        except E.LmxError as exc:
            await self._failed(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("internal.start_failed")
            await self._failed(E.InternalError(f"start failed: {exc!r}"))

    async def _admit(self) -> E.LmxError | None:
        orphan, sup = self._orphan, self.config.supervisor
        # A worker of ours still serving this revision is adopted first: no registry verdict takes
        # down a model that is serving (only integrity and memory can refuse it).
        adoptable = orphan is not None and orphan["revision"] == self.running.revision
        # Cached hashes cannot see bit rot: after a failure (or an operator's release) read it all.
        fresh = self._doubt or bool(self.store.failures(self.cfg.id, time.time() - self.config.restart.window_s))
        self._doubt = False
        refusal = await admission.admit(self.cfg.id, self.running, self.store, self._ledger, self._evict,
                                        self._force or adoptable, sup.model_roots, fresh)
        if refusal is not None and orphan is not None:
            self._orphan = None  # refused: end it now rather than leave it waiting out its grace
            self._end_orphan(orphan, f"admission refused: {refusal.code.code}")
        return refusal

    async def _refused(self, refusal: E.LmxError) -> None:
        self.last_error = refusal
        self.log.warning("model.rejected", code=refusal.code.code, message=refusal.message,
                         file=refusal.details.get("file"), revision=self.running.revision)
        await self._apply(lifecycle.Refused(refusal.code.code, refusal.message, self.running.revision),
                          refusal.code.code, refusal, now=time.time())

    async def _start_worker(self) -> None:
        cfg = self.running
        orphan, self._orphan = self._orphan, None
        if orphan is not None and orphan["revision"] == cfg.revision:
            self._to(S.STARTING, f"adopting worker pid {orphan['pid']}")
            worker = await self._adopt(orphan)
        else:
            if orphan is not None:
                self._end_orphan(orphan, f"its revision {orphan['revision']} is no longer wanted")
            self._to(S.STARTING, "spawn")
            worker = None
        if worker is not None:
            self._to(S.CANARY, "adopted: weights already loaded")
        else:
            worker = await self._spawn_and_load(cfg)
        result = await run_canary(cfg.canary, self.requests, self.log)
        ready = worker.ready.result() if worker.ready.done() and not worker.ready.exception() else None
        self.canary = self._evidence().canary_passed(cfg.canary, result, ready.load_s if ready else None,
                                                     worker.memory)
        self.retry_at = None
        self.ready_since = time.monotonic()
        self._to(S.READY, "canary passed", canary_tokens=result.usage.get("completion_tokens"))
        p = worker.process
        self.store.set_worker(self.cfg.id, adoption.worker_record(
            p.pid, p.start_time, p.token, cfg.revision, self._endpoint, self.store.boot_id))
        self._stable = asyncio.get_running_loop().call_later(
            self.config.restart.stable_after_s, self._on_stable, worker)

    def _new_worker(self, cfg: ModelConfig, token: str) -> Worker:
        loop = asyncio.get_running_loop()
        process = WorkerProcess(cfg, self._endpoint, token, loop, self._on_exit, self._log_dir,
                                hub_downloads=self.config.supervisor.hub_downloads)
        worker = Worker(process, cfg, loop)
        self.worker = worker
        self._hub.register(token, self)
        return worker

    def _watch_it(self, worker: Worker) -> None:
        self._watch = asyncio.get_running_loop().create_task(worker.watch(self.config.supervisor, self.log),
                                                             name=f"watch-{self.cfg.id}")

    def _from_spare(self, cfg: ModelConfig) -> Worker | None:
        """A warm spare (interpreter up, mlx-lm imported) becomes this model's worker, if the pool
        has one and the model runs the standard worker."""
        spare = self.spares.take() if self.spares is not None and cfg.worker_command is None else None
        if spare is None or spare.hello is None:
            return None
        process = spare.process
        process.assign(cfg, self._on_exit)
        worker = Worker(process, cfg, asyncio.get_running_loop())
        worker.hello.set_result(spare.hello)
        self.worker = worker
        self._hub.register(process.token, self)
        self.log.info("worker.from_spare", worker_pid=process.pid)
        return worker

    async def _spawn_and_load(self, cfg: ModelConfig) -> Worker:
        worker = self._from_spare(cfg)
        if worker is None:
            worker = self._new_worker(cfg, secrets.token_hex(16))
            worker.process.spawn()
        self._watch_it(worker)
        sup = self.config.supervisor
        await wait_for(worker.hello, HELLO_TIMEOUT_S, E.LoadTimeout("worker sent no hello"))
        self._hub.send(worker.process.token, Init(cfg.id, cfg.revision, cfg.path, sup.heartbeat_interval_s,
                                                  sup.orphan_grace_s, cfg.memory_limit_bytes,
                                                  cfg.max_batch_size, cfg.prefill_step_size,
                                                  cfg.stream_interval_s, context_tokens=cfg.context_tokens,
                                                  **self._prefix_cache_init(cfg)))
        self._to(S.LOADING, "handshake done")
        await wait_for(worker.ready, sup.load_timeout_s,
                          E.LoadTimeout(f"no ready within load_timeout_s={sup.load_timeout_s}"))
        self._to(S.CANARY, "weights loaded")
        return worker

    def clear_prefix_cache(self) -> dict[str, int]:
        """lmxctl cache clear: the worker forgets its entries; their files go now, from here too."""
        if self.worker is not None and self.worker.process.alive:
            self._hub.send(self.worker.process.token, ClearPrefixCache())
        removed = kvcache.clear(self._log_dir.parent, self.cfg.id) if self._log_dir is not None else {}
        self.log.info("model.prefix_cache_cleared", **removed)
        return removed

    def _prefix_cache_init(self, cfg: ModelConfig) -> dict[str, Any]:
        # The state dir holds the logs: hot prefixes go beside them (none without one: a probe).
        state_dir = self._log_dir.parent if self._log_dir is not None else None
        try:
            return kvcache.init_fields(cfg, state_dir)
        except OSError as exc:  # an unwritable cache dir costs persistence, not the model
            self.log.warning("model.prefix_cache_dir_unusable", error=str(exc))
            return kvcache.init_fields(cfg, None)

    async def _adopt(self, record: dict[str, Any]) -> Worker | None:
        """The worker proves itself with an adoption hello, or is ended and a fresh one spawned.
        Neither outcome is a model failure: the supervisor, not the model, went away."""
        worker = self._new_worker(self.running, record["token"])
        try:
            worker.process.adopt(record["pid"], record["start_time"])
        except AdoptionRefused as exc:
            self._forget(worker)
            self.log.info("worker.adoption_skipped", reason=str(exc), worker_pid=record["pid"])
            return None
        self._watch_it(worker)
        sup = self.config.supervisor
        try:
            hello = await wait_for(worker.hello, max(5.0, 3 * sup.heartbeat_interval_s),
                                      E.LoadTimeout("no adoption hello"))
            why = adoption.refusal(hello, record, self.running.revision)
        except E.LmxError as exc:
            why = exc.message
        if why is not None:
            self.log.warning("worker.adoption_refused", reason=why, worker_pid=record["pid"])
            await self._stop_worker(f"adoption refused: {why}")
            return None
        self._hub.send(worker.process.token, adoption.adopt_message())
        self.log.info("worker.adopted", worker_pid=record["pid"], revision=record["revision"])
        return worker

    def _forget(self, worker: Worker) -> None:
        self._hub.unregister(worker.process.token)
        if self.worker is worker:
            self.worker = None

    def _end_orphan(self, record: dict[str, Any], why: str) -> None:
        """A previous run's worker we will not adopt: end it (after proving pid and start time)."""
        process = WorkerProcess(self.running, self._endpoint, record["token"], asyncio.get_running_loop(),
                                lambda *_: None, self._log_dir)
        try:
            process.adopt(record["pid"], record["start_time"])
        except AdoptionRefused:
            return
        self.log.info("worker.orphan_ended", worker_pid=record["pid"], reason=why)
        asyncio.get_running_loop().create_task(process.stop(why, self.config.supervisor.stop_timeout_s))

    def _on_stable(self, worker: Worker) -> None:
        for effect in self._reduce(lifecycle.Stable(self.worker is worker)):
            self._do(effect, "stable")

    async def _failed(self, exc: E.LmxError, verdict: Verdict | None = None) -> None:
        """A start or a READY worker failed: stop what is left, fail its requests, then perform what
        lifecycle.reduce says: restart (BACKOFF), roll back, or quarantine."""
        self.last_error = exc
        self.restarts += 1
        self.metrics.restarts.labels(self.cfg.id).inc()
        self.consecutive_failures += 1
        worker = self.worker
        if verdict is None and worker is not None:
            verdict = worker.death  # a death during start surfaced as the awaited future's error
        phase = self.state.value
        self.log.warning("model.failed", code=exc.code.code, message=exc.message, phase=phase, **exc.details)
        self.requests.fail_all(exc)  # before the stop ladder and the store: nobody waits on either
        await self._stop_worker(f"failed: {exc.code.code}")
        now = time.time()
        event = lifecycle.Failed(exc.code.code, exc.message, self.running.revision,
                                 self.store.model_flags(self.cfg.id)["lkg_revision"], self.consecutive_failures,
                                 bool(verdict and verdict.victim))
        record = lifecycle.crash_record(self.cfg.id, self.running.revision, now, exc, verdict, worker, phase)
        await self._apply(event, exc.code.code, exc, record, now)

    def _reduce(self, event: lifecycle.Event, now: float = 0.0) -> list[lifecycle.Effect]:
        history = self.store.failures(self.cfg.id, now - self.config.restart.window_s) if now else []
        return lifecycle.reduce(self.state, event, history, now, self.config.restart)[1]

    async def _apply(self, event: lifecycle.Event, reason: str, exc: E.LmxError | None = None,
                     record: dict[str, Any] | None = None, now: float = 0.0) -> None:
        """Ask lifecycle.reduce what `event` means in this state, then do it, in order."""
        for effect in self._reduce(event, now):
            if isinstance(effect, lifecycle.RollBack):
                await self.rollback(effect.revision, effect.reason)
            elif isinstance(effect, lifecycle.Drain):
                await self._drain(self.config.supervisor.drain_grace_s)
            elif isinstance(effect, lifecycle.StopWorker):
                await self._stop_worker(reason)
            elif isinstance(effect, lifecycle.BringUp):
                self.retry_at = None
                await self._bring_up()
            else:
                self._do(effect, reason, exc, record)

    def _do(self, effect: lifecycle.Effect, reason: str, exc: E.LmxError | None = None,
            record: dict[str, Any] | None = None) -> None:
        """The effects that need no waiting (those of a worker's exit, which is a callback)."""
        exc = exc or E.ShuttingDown(f"model stopped: {reason}")
        if isinstance(effect, lifecycle.Go):
            self._to(effect.to, reason)
        elif isinstance(effect, lifecycle.FailRequests):
            self.requests.fail_all(exc)
        elif isinstance(effect, lifecycle.RecordFailure):
            self.store.add_failure(self.cfg.id, effect.failure)
        elif isinstance(effect, lifecycle.RecordCrash) and record is not None:
            self.store.add_crash(record)
            self.metrics.crashes.labels(self.cfg.id, exc.code.code).inc()
            self.events.publish("model.failed", **{k: v for k, v in record.items() if k != "at"})
            self._evidence().failure(record)  # the registry takes only what is about compatibility
        elif isinstance(effect, lifecycle.EnterBackoff):
            self.retry_at = time.monotonic() + effect.delay_s
            self._to(S.BACKOFF, exc.code.code, code=exc.code.code, retry_after_s=round(effect.delay_s, 3),
                     failures_in_window=effect.failures_in_window)
        elif isinstance(effect, lifecycle.Quarantine):
            self._quarantine(exc, effect.summary)
        elif isinstance(effect, lifecycle.ScheduleRestart):
            self._spawn_task(self._restart_after(effect.delay_s))
        elif isinstance(effect, lifecycle.Reject):
            self._to(S.REJECTED, exc.code.code, code=exc.code.code, message=exc.message,
                     file=exc.details.get("file"))
        elif isinstance(effect, lifecycle.MarkStable):
            self.consecutive_failures = 0
            self.store.set_lkg(self.running)
            self.log.info("model.stable", revision=self.running.revision, lkg=True)

    def _quarantine(self, exc: E.LmxError, summary: dict[str, Any]) -> None:
        self.retry_at = None
        self.store.set_quarantine(self.cfg.id, summary)
        details = {k: v for k, v in summary.items() if k != "message"}
        self.last_error = E.ModelQuarantined(summary["message"], **details)
        self.log.error("model.quarantined", code=exc.code.code, message=summary["message"],
                       hint=f"lmxctl history {self.cfg.id}; after fixing the cause: lmxctl release {self.cfg.id}")
        self._to(S.QUARANTINED, "too many failures", **details)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._apply(lifecycle.RestartDue(), "restart")

    async def rollback(self, revision: str | None, reason: str) -> str:
        """Run `revision` (default: last-known-good) instead of what runs now. From BACKOFF this is
        the policy's automatic rollback; from any other state an operator's, which also lifts a
        quarantine."""
        target = revision or self.store.model_flags(self.cfg.id)["lkg_revision"]
        cfg = self.store.revision(self.cfg.id, target) if target else None
        if cfg is None:
            raise E.BadRequest(f"model {self.cfg.id} has no known revision {target!r}")
        if self.state is S.BACKOFF:
            self.running = cfg
            self._remember(self.wanted())
            self._to(S.ROLLING_BACK, reason, target_revision=target, configured_revision=self.cfg.revision)
            self._spawn_task(self._bring_up())
            return self.state.value
        await self.stop(f"operator rollback to {target}", remember=False)
        self.store.set_quarantine(self.cfg.id, None)
        self.running = cfg
        self.start(f"operator rollback to {target}", wanted=True, force=True)
        return self.state.value

    async def repair(self) -> dict[str, Any]:
        """Operator: fetch what admission found missing or corrupt, verify, re-admit (modelrepair)."""
        return await modelrepair.repair(self)

    async def release(self) -> str:
        """Operator: leave QUARANTINED (or REJECTED) and try again on the configured revision."""
        if self.state not in (S.QUARANTINED, S.REJECTED):
            raise E.BadRequest(f"model {self.cfg.id} is {self.state.value}, not QUARANTINED or REJECTED")
        self.store.set_quarantine(self.cfg.id, None)
        self.store.clear_failures(self.cfg.id)
        self.consecutive_failures = 0
        self.last_error = None  # the operator fixed the cause; a new failure will say its own
        self.running = self.cfg
        self._remember(True)
        self._force = True  # the operator asks: a registry verdict of "failed" does not stop it
        self._doubt = True  # whatever it was, the files are read again before they are trusted
        self._to(S.ADMITTING, "operator release")
        self._spawn_task(self._bring_up())
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
        # Called where requests end in our sight: results, cancels, a death. A queued request's
        # deadline ends it unseen, but it waits only behind active ones, whose ends are seen.
        if self._idle is not None and not len(self.requests):
            self._idle.set()

    async def _stop_worker(self, reason: str) -> None:
        worker = self.worker
        if worker is None:
            return
        worker.stopping = True
        for handle in (self._watch, self._stable):
            if handle:
                handle.cancel()
        token = worker.process.token
        await worker.process.stop(reason, self.config.supervisor.stop_timeout_s,
                                  ask=lambda: self._hub.send(token, Shutdown(reason)))
        self._hub.unregister(token)
        self.store.set_worker(self.cfg.id, None)
        if self.worker is worker:
            self.worker = None
            self.ready_since = None

    # --- worker events -------------------------------------------------------------------------

    def _on_exit(self, process: WorkerProcess, rc: int | None) -> None:
        worker = self.worker
        if worker is None or worker.process is not process:
            return  # a worker already replaced: its exit was seen to when it was
        self._ledger.worker_exited(self.cfg.id, process.pid, worker.memory.get("rss_bytes", 0),
                                   worker.available_at_beat)
        effects = self._reduce(lifecycle.WorkerExited(worker.stopping))
        if not effects:
            return
        verdict = classify(rc, process.stderr_tail, killed_for=worker.killed_for, last_memory=worker.memory,
                           memory_limit_bytes=worker.cfg.memory_limit_bytes)
        exc = E.error_class(verdict.code)(verdict.message(process.pid), worker_pid=process.pid,
                                          cause=verdict.cause, **verdict.details)
        worker.fail_handshake(exc)  # WorkerDied: each exit that is not our stop is one
        worker.death = verdict
        worker.death_request = self.requests.first_active_origin()
        self.requests.fail_all(exc)  # clients hear of the death before anything touches the disk
        self._check_idle()
        self.store.set_worker(self.cfg.id, None)
        if lifecycle.HandleFailure() in effects:
            self._spawn_task(self._failed(exc, verdict))

    def on_worker_garbage(self, error: Exception) -> None:
        """A frame from our own worker's identity that breaks the protocol: the worker is no longer
        trusted. It is killed; its death is a counted WORKER_CRASHED, cause "protocol violation"."""
        worker = self.worker
        if worker is None or worker.killed_for is not None:
            return  # already on its way out: its further frames change nothing
        self.log.error("worker.protocol_violation", error=str(error)[:500], worker_pid=worker.process.pid)
        worker.kill_for(E.ErrorCode.WORKER_CRASHED, f"protocol violation: {str(error)[:200]}")

    def on_worker_message(self, msg: Message) -> None:
        worker = self.worker
        if worker is None or worker.on_message(msg):
            return
        if isinstance(msg, Chunks):
            for chunk in msg.chunks():
                self.requests.on_result(chunk)
        elif isinstance(msg, (Chunk, Final, Error)) and msg.request_id:
            if not isinstance(msg, Chunk):
                worker.via_io.discard(msg.request_id)
            self.requests.on_result(msg)
        self._check_idle()

    # --- requests ------------------------------------------------------------------------------

    def _send_to_worker(self, msg: Message) -> bool:
        """A request, or a cancel, which goes the way its request went: on one socket, so they are
        never reordered."""
        worker = self.worker
        if worker is None or not worker.process.alive:
            return False
        rid = getattr(msg, "request_id", None)
        direct = worker.direct_requests and rid not in worker.via_io
        if not self._hub.send(worker.process.token, msg, to_main=direct) and isinstance(msg, GenerateRequest):
            worker.via_io.add(msg.request_id)
        return True

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
        self._check_idle()

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        w = self.worker
        err = self.last_error
        window = self.config.restart.window_s
        now = time.time()
        history = self.store.failures(self.cfg.id, now - window)
        return {
            "id": self.cfg.id,
            "state": self.state.value,
            "autoload": self.cfg.autoload,
            "pinned": self.cfg.pinned,
            "idled_out": self.idled_out,
            "wanted": self.wanted(),  # the operator's last load/unload (None: as the config says)
            "revision": self.running.revision,
            "configured_revision": self.cfg.revision,
            "lkg_revision": self.store.model_flags(self.cfg.id)["lkg_revision"],
            "worker_pid": w.process.pid if w else None,
            "restarts": self.restarts,
            "failures_in_window": policy.failures_in_window(history, now, window),
            "last_error": {"code": err.code.code, "message": err.message} if err else None,
            "quarantined": self.state is S.QUARANTINED,
            "retry_after_s": self.retry_after_s() if self.state in states.PENDING_STATES else None,
            "ready_for_s": round(time.monotonic() - self.ready_since, 3) if self.ready_since else None,
            "queued": self.requests.queued,
            "active": len(self.requests.active),
            "phase": w.phase if w else None,
            "memory": dict(w.memory) if w else {},
            "prefix_cache": self.cache_totals.observe(w.process.pid if w else None, w.cache if w else {}),
            "canary": self.canary,
        }
