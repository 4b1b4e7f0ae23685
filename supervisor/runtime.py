"""One model's life in the supervisor: its state, its worker, its request queue and its canary."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol import errors as E
from protocol.messages import (
    Cancel, Chunk, Error, Final, GenerateRequest, Heartbeat, Hello, Init, Message, Ready, Shutdown,
)
from supervisor import logs, policy, states
from supervisor.config import Config, ModelConfig
from supervisor.hub import WorkerHub
from protocol.exitcodes import WorkerExit
from supervisor.process import WorkerProcess, describe_exit
from supervisor.states import ModelState as S

Sink = Callable[[Message], None]
MAX_QUEUE = 64
HELLO_TIMEOUT_S = 60.0


@dataclass
class Pending:
    wrid: str
    req: GenerateRequest
    sink: Sink
    timer: asyncio.TimerHandle | None = None


@dataclass
class Worker:
    """What the supervisor knows about one live worker process."""

    process: WorkerProcess
    revision: str
    hello: asyncio.Future
    ready: asyncio.Future
    last_heartbeat: float = field(default_factory=time.monotonic)
    progress: int = 0
    phase: str = "starting"
    memory: dict = field(default_factory=dict)
    stopping: bool = False
    kill_error: E.LmxError | None = None


def _discard(_: Message) -> None:
    pass


class ModelRuntime:
    def __init__(self, model: ModelConfig, config: Config, hub: WorkerHub, worker_endpoint: str) -> None:
        self.cfg = model
        self.config = config
        self.state = S.UNLOADED
        self.worker: Worker | None = None
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: E.LmxError | None = None
        self.retry_at: float | None = None
        self.ready_since: float | None = None
        self._hub = hub
        self._endpoint = worker_endpoint
        self._ids = itertools.count(1)
        self._active: Pending | None = None
        self._queue: collections.deque[Pending] = collections.deque()
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.log = logs.get(model=model.id)

    # --- state ---------------------------------------------------------------------------------

    def _to(self, to: S, reason: str, **fields: Any) -> None:
        pid = self.worker.process.pid if self.worker else None
        self.state = states.apply(self.state, to, reason, self.log.info, worker_pid=pid, **fields)

    def retry_after_s(self) -> float:
        if self.retry_at is not None:
            return round(max(0.0, self.retry_at - time.monotonic()), 3)
        return 1.0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, reason: str) -> bool:
        """Begin bringing the model to READY; False when it is already on its way or there."""
        if self.state not in (S.UNLOADED, S.REJECTED):
            return False
        self._to(S.ADMITTING, reason)
        self._task = asyncio.get_running_loop().create_task(self._bring_up(), name=f"up-{self.cfg.id}")
        return True

    def _admit(self) -> E.LmxError | None:
        # The full admission gate (integrity, architecture, memory) belongs to issue 4; the
        # cheapest refusal is here already so a typo'd path never spawns a worker.
        if not os.path.isdir(self.cfg.path):
            return E.SnapshotNotFound(f"model path {self.cfg.path} does not exist", path=self.cfg.path)
        return None

    async def _bring_up(self) -> None:
        if self.state is S.ADMITTING:
            refusal = self._admit()
            if refusal is not None:
                self.last_error = refusal
                self._to(S.REJECTED, refusal.code.code, code=refusal.code.code, message=refusal.message)
                return
        try:
            await self._start_worker()
        except E.LmxError as exc:
            await self._failed(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("internal.start_failed")
            await self._failed(E.InternalError(f"start failed: {exc!r}"))

    async def _start_worker(self) -> None:
        loop = asyncio.get_running_loop()
        token = secrets.token_hex(16)
        process = WorkerProcess(self.cfg, self._endpoint, token, loop, self._on_exit)
        worker = Worker(process, self.cfg.revision, loop.create_future(), loop.create_future())
        self.worker = worker
        self._hub.register(token, self)
        self._to(S.STARTING, "spawn")
        process.spawn()
        self._watch = loop.create_task(self._watch_heartbeats(worker), name=f"hb-{self.cfg.id}")
        sup = self.config.supervisor
        await self._await(worker.hello, HELLO_TIMEOUT_S, E.LoadTimeout("worker sent no hello"))
        self._hub.send(token, Init(self.cfg.id, worker.revision, self.cfg.path, sup.heartbeat_interval_s,
                                   sup.orphan_grace_s, self.cfg.memory_limit_bytes))
        self._to(S.LOADING, "handshake done")
        await self._await(worker.ready, sup.load_timeout_s,
                          E.LoadTimeout(f"no ready within load_timeout_s={sup.load_timeout_s}"))
        self._to(S.CANARY, "weights loaded")
        await self._canary()
        self.consecutive_failures = 0
        self.retry_at = None
        self.ready_since = time.monotonic()
        self._to(S.READY, "canary passed")

    async def _await(self, fut: asyncio.Future, timeout_s: float, on_timeout: E.LmxError) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise on_timeout from None

    async def _canary(self) -> None:
        c = self.cfg.canary
        req = GenerateRequest("", self.cfg.id, messages=[{"role": "user", "content": c.prompt}],
                              max_tokens=c.max_tokens, temperature=0.0)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        def sink(msg: Message) -> None:
            if isinstance(msg, (Final, Error)) and not fut.done():
                fut.set_result(msg)

        wrid = self._enqueue(req, sink)
        try:
            out = await asyncio.wait_for(asyncio.shield(fut), c.timeout_s)
        except asyncio.TimeoutError:
            self.cancel(wrid)
            raise E.CanaryTimeout(f"canary produced no result within {c.timeout_s}s") from None
        if isinstance(out, Error):
            exc = out.to_exc()
            if exc.code in (E.ErrorCode.WORKER_CRASHED, E.ErrorCode.WORKER_OOM, E.ErrorCode.WORKER_HUNG):
                raise exc
            raise E.CanaryFailed(f"canary failed: {exc.code.code}: {exc.message}")
        tokens = out.usage.get("completion_tokens", 0)
        if tokens < 1:
            raise E.CanaryFailed("canary generated no tokens")
        if c.expect is not None and c.expect not in out.text:
            raise E.CanaryFailed(f"canary output lacks {c.expect!r}", output=out.text[:200])
        self.log.info("model.canary_passed", tokens=tokens, text=out.text[:200],
                      duration_s=out.timings.get("total_s"))

    async def _failed(self, exc: E.LmxError) -> None:
        """A start or a READY worker failed: stop what is left, fail its requests, back off."""
        self.last_error = exc
        self.restarts += 1
        self.consecutive_failures += 1
        self.log.warning("model.failed", code=exc.code.code, message=exc.message, **exc.details)
        await self._stop_worker(f"failed: {exc.code.code}")
        self._fail_requests(exc)
        delay = policy.backoff_s(self.consecutive_failures, self.config.restart)
        self.retry_at = time.monotonic() + delay
        self._to(S.BACKOFF, exc.code.code, code=exc.code.code, retry_after_s=round(delay, 3))
        self._task = asyncio.get_running_loop().create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state is S.BACKOFF:
            self.retry_at = None
            await self._bring_up()

    async def stop(self, reason: str) -> None:
        """Drain (bounded by drain_grace_s), then stop the worker: READY/... -> DRAINING -> UNLOADED."""
        if self._task and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        if self.state in states.WORKER_STATES and self.state is not S.DRAINING:
            self._to(S.DRAINING, reason)
            await self._drain(self.config.supervisor.drain_grace_s)
            await self._stop_worker(reason)
            self._fail_requests(E.ShuttingDown(f"model stopped: {reason}"))
            self._to(S.UNLOADED, reason)
        elif self.state in (S.BACKOFF, S.ADMITTING, S.REJECTED):
            await self._stop_worker(reason)
            self._to(S.UNLOADED, reason)

    async def _drain(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while (self._active or self._queue) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _stop_worker(self, reason: str) -> None:
        worker = self.worker
        if worker is None:
            return
        worker.stopping = True
        if self._watch:
            self._watch.cancel()
        token = worker.process.token
        await worker.process.stop(reason, self.config.supervisor.stop_timeout_s,
                                  ask=lambda: self._hub.send(token, Shutdown(reason)))
        self._hub.unregister(token)
        if self.worker is worker:
            self.worker = None
            self.ready_since = None

    # --- worker events -------------------------------------------------------------------------

    def _on_exit(self, process: WorkerProcess, rc: int) -> None:
        worker = self.worker
        if worker is None or worker.process is not process or worker.stopping:
            return
        exc = worker.kill_error or self._classify_exit(process, rc)
        for fut in (worker.hello, worker.ready):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # whoever awaits it gets exc; nobody awaiting is not an error
        self._fail_requests(exc)
        if self.state is S.READY:
            self._task = asyncio.get_running_loop().create_task(self._failed(exc))

    def _classify_exit(self, process: WorkerProcess, rc: int) -> E.LmxError:
        how = describe_exit(rc)
        if rc == WorkerExit.LOAD_FAILED:
            last = next((l for l in reversed(process.stderr_tail) if "load_failed" in l), "")
            return E.LoadFailed(f"worker failed to load the snapshot {last[-300:]}".strip(), **how)
        what = f"signal {how['signal']}" if how["signal"] else f"exit code {how['exit_code']}"
        return E.WorkerCrashed(f"worker pid {process.pid} died: {what}", worker_pid=process.pid, **how)

    def on_worker_garbage(self, error: Exception) -> None:
        self.log.error("worker.protocol_violation", error=str(error))

    def on_worker_message(self, msg: Message) -> None:
        worker = self.worker
        if worker is None:
            return
        if isinstance(msg, Heartbeat):
            worker.last_heartbeat = time.monotonic()
            worker.progress, worker.phase, worker.memory = msg.progress, msg.phase, msg.memory
        elif isinstance(msg, (Chunk, Final, Error)) and msg.request_id:
            self._on_result(msg)
        elif isinstance(msg, Hello) and not worker.hello.done():
            worker.last_heartbeat = time.monotonic()
            worker.hello.set_result(msg)
        elif isinstance(msg, Ready) and not worker.ready.done():
            if msg.revision != worker.revision:
                worker.ready.set_exception(E.LoadFailed(f"worker loaded revision {msg.revision}"))
            else:
                worker.memory = msg.memory
                worker.ready.set_result(msg)
        elif isinstance(msg, Error) and not worker.ready.done():
            worker.ready.set_exception(msg.to_exc())

    async def _watch_heartbeats(self, worker: Worker) -> None:
        sup = self.config.supervisor
        while worker.process.alive:
            await asyncio.sleep(sup.heartbeat_interval_s)
            silent_s = time.monotonic() - worker.last_heartbeat
            if silent_s > sup.heartbeat_timeout_s and worker.process.alive and not worker.stopping:
                worker.kill_error = E.WorkerHung(
                    f"no heartbeat for {silent_s:.1f}s (heartbeat_timeout_s={sup.heartbeat_timeout_s})",
                    worker_pid=worker.process.pid)
                self.log.error("worker.hung", silent_s=round(silent_s, 3), worker_pid=worker.process.pid)
                worker.process.signal_group(9)
                return

    # --- requests ------------------------------------------------------------------------------

    def submit(self, req: GenerateRequest, sink: Sink) -> str:
        """Queue a client request; raises the typed refusal when the model is not routable."""
        if self.state is not S.READY:
            if self.state in states.PENDING_STATES:
                raise E.ModelNotReady(f"model {self.cfg.id} is {self.state.value}",
                                      state=self.state.value, retry_after_s=self.retry_after_s())
            err = self.last_error
            raise E.ModelNotReady(
                f"model {self.cfg.id} is {self.state.value}"
                + (f" (last error {err.code.code}: {err.message})" if err else ""),
                state=self.state.value)
        if len(self._queue) >= MAX_QUEUE:
            raise E.Overloaded(f"model {self.cfg.id} has {len(self._queue)} queued requests",
                               retry_after_s=1.0)
        return self._enqueue(req, sink)

    def _enqueue(self, req: GenerateRequest, sink: Sink) -> str:
        wrid = str(next(self._ids))
        req = GenerateRequest(**{**req.to_wire(), "request_id": wrid})
        pending = Pending(wrid, req, sink)
        if req.timeout_s is not None:
            pending.timer = asyncio.get_running_loop().call_later(req.timeout_s, self._expire, wrid)
        self._queue.append(pending)
        self._dispatch()
        return wrid

    def _dispatch(self) -> None:
        if self._active is not None or not self._queue or self.worker is None:
            return
        self._active = self._queue.popleft()
        self._hub.send(self.worker.process.token, self._active.req)

    def _on_result(self, msg: Message) -> None:
        p = self._active
        if p is None or p.wrid != msg.request_id:
            return
        p.sink(msg)
        if isinstance(msg, (Final, Error)):
            if p.timer:
                p.timer.cancel()
            self._active = None
            self._dispatch()

    def _end(self, wrid: str, exc: E.LmxError) -> None:
        """End one request for its client now; an active one is also cancelled in the worker."""
        for p in list(self._queue):
            if p.wrid == wrid:
                self._queue.remove(p)
                self._finish(p, exc)
                return
        p = self._active
        if p is not None and p.wrid == wrid and p.sink is not _discard:
            self._finish(p, exc)
            if self.worker is not None:
                self._hub.send(self.worker.process.token, Cancel(wrid))

    def cancel(self, wrid: str) -> None:
        self._end(wrid, E.Cancelled("cancelled by client"))

    def _expire(self, wrid: str) -> None:
        self._end(wrid, E.RequestTimeout("request deadline passed"))

    def _finish(self, p: Pending, exc: E.LmxError) -> None:
        if p.timer:
            p.timer.cancel()
        sink, p.sink = p.sink, _discard
        sink(Error.from_exc(p.wrid, exc))

    def _fail_requests(self, exc: E.LmxError) -> None:
        pending = ([self._active] if self._active else []) + list(self._queue)
        self._active = None
        self._queue.clear()
        for p in pending:
            self._finish(p, exc)

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        w = self.worker
        err = self.last_error
        return {
            "id": self.cfg.id,
            "state": self.state.value,
            "revision": self.cfg.revision,
            "worker_pid": w.process.pid if w else None,
            "restarts": self.restarts,
            "failures_in_window": self.consecutive_failures,
            "last_error": {"code": err.code.code, "message": err.message} if err else None,
            "quarantined": self.state is S.QUARANTINED,
            "retry_after_s": self.retry_after_s() if self.state in states.PENDING_STATES else None,
            "ready_for_s": round(time.monotonic() - self.ready_since, 3) if self.ready_since else None,
            "queued": len(self._queue),
            "active": 1 if self._active else 0,
            "phase": w.phase if w else None,
            "memory": dict(w.memory) if w else {},
        }
