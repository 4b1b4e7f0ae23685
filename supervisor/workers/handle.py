"""One worker, owned by one object: its process, its identities on the hub, which socket a message
takes, its handshake and heartbeats, the liveness watch, and the stop ladder. Spawning, taking a
warm spare, adopting a previous run's worker and ending an orphan are its constructors; `close()`
is idempotent. Nothing outside mutates a handle's fields."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from typing import Callable

from protocol import errors as E
from protocol.messages import (
    Embeddings, Error, Final, Heartbeat, Hello, Init, Message, Ready, RerankScores, Shutdown, TokenCount,
)
from protocol.phase import Phase
from supervisor import logs
from supervisor.admission.memory import available_bytes
from supervisor.config import ModelConfig, SupervisorSettings
from supervisor.persistence.records import WorkerRecord
from supervisor.workers import adoption
from supervisor.workers.classify import classify
from supervisor.workers.liveness import liveness_verdict
from supervisor.workers.process import AdoptionRefused, WorkerProcess
from supervisor.workers.worker import Death, Handshake, Host, Owner, wait_for

__all__ = ["AdoptionRefused", "Owner", "WorkerHandle", "wait_for"]


class WorkerHandle:
    """A Worker (supervisor.workers.worker) that is one process on this host."""

    def __init__(self, process: WorkerProcess, host: Host, owner: Owner) -> None:
        self.process = process
        self.cfg = process.model
        self._hub = host.hub
        self._owner = owner
        self.handshake = Handshake()
        now = time.monotonic()
        self.last_heartbeat = now
        self.progress = 0
        self.progress_at = now
        self.phase: str = Phase.STARTING
        self.memory: dict = {}
        self.cache: dict = {}  # the prefix cache's figures from the last heartbeat
        self.available_at_beat: int | None = None  # the machine's, when the last figures came
        self.stopping = False
        self.killed_for: tuple[E.ErrorCode, str] | None = None  # why the supervisor killed it
        self.death: Death | None = None  # how it died, when it died unasked
        # Requests sent through its IO thread (its main thread's socket not heard from yet): their
        # cancels go the same way, so a cancel never overtakes its request.
        self._via_io: set[str] = set()
        self._watch: asyncio.Task | None = None
        self._closed: asyncio.Future | None = None
        self.log = logs.get(model=self.cfg.id)
        if self._hub is not None:
            self._hub.register(process.token, self)

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def _process(cls, cfg: ModelConfig, host: Host, token: str, on_exit: Callable,
                 spare: bool = False, env: dict[str, str] | None = None) -> WorkerProcess:
        sup = host.config.supervisor
        return WorkerProcess(cfg, host.worker_endpoint, token, asyncio.get_running_loop(), on_exit,
                             host.log_dir, hub_downloads=sup.hub_downloads, spare=spare,
                             handshake_timeout_s=sup.handshake_timeout_s, env=env)

    @classmethod
    def _new(cls, cfg: ModelConfig, host: Host, owner: Owner, token: str,
             spare: bool = False, env: dict[str, str] | None = None) -> "WorkerHandle":
        """A handle on the hub whose process (not started or adopted yet) reports its exit to it."""
        handle: WorkerHandle
        process = cls._process(cfg, host, token, lambda p, rc: handle._exited(rc), spare, env)
        handle = cls(process, host, owner)
        return handle

    @classmethod
    def spawn(cls, cfg: ModelConfig, host: Host, owner: Owner, spare: bool = False,
              env: dict[str, str] | None = None) -> "WorkerHandle":
        """A new worker process (with `spare`: one that imports mlx-lm and waits for a model; with
        `env`: MLX's variables that make it a rank of a group)."""
        handle = cls._new(cfg, host, owner, secrets.token_hex(16), spare, env)
        handle.process.spawn()
        return handle

    def assign(self, cfg: ModelConfig, owner: Owner) -> None:
        """A warm spare becomes `cfg`'s worker: its exit, its results and its log lines are the model's now."""
        self.process.assign(cfg, lambda p, rc: self._exited(rc))
        self.cfg, self._owner = cfg, owner
        self.log = logs.get(model=cfg.id)
        self.log.info("worker.from_spare", worker_pid=self.process.pid)

    @classmethod
    def adopt(cls, record: WorkerRecord, cfg: ModelConfig, host: Host, owner: Owner) -> "WorkerHandle":
        """A previous supervisor run's worker, once pid and start time match; AdoptionRefused if not.
        It has yet to prove itself with an adoption hello (`prove`)."""
        handle = cls._new(cfg, host, owner, record.token)
        try:
            handle.process.adopt(record.pid, record.start_time)
        except AdoptionRefused:
            handle._unregister()
            raise
        return handle

    async def prove(self, record: WorkerRecord, revision: str, timeout_s: float) -> str | None:
        """Wait for the adoption hello; None when it proves this is the recorded worker on `revision`
        (it is then told it is ours again), else why not."""
        try:
            hello = await wait_for(self.hello, timeout_s, E.LoadTimeout("no adoption hello"))
            why = adoption.refusal(hello, record, revision)
        except E.LmxError as exc:
            why = exc.message
        if why is None:
            self.tell(adoption.adopt_message())
        return why

    @classmethod
    def end_orphan(cls, record: WorkerRecord, cfg: ModelConfig, host: Host, why: str) -> None:
        """A previous run's worker nobody will adopt: ended (once pid and start time match, so a
        stranger that reused the pid is never touched). Nothing routes to it meanwhile."""
        process = cls._process(cfg, host, record.token, lambda *_: None)
        try:
            process.adopt(record.pid, record.start_time)
        except AdoptionRefused:
            return
        process.log.info("worker.orphan_ended", reason=why)
        asyncio.get_running_loop().create_task(process.stop(why, host.config.supervisor.stop_timeout_s))

    # --- the wire ------------------------------------------------------------------------------

    @property
    def hello(self) -> asyncio.Future:
        return self.handshake.hello

    @property
    def ready(self) -> asyncio.Future:
        return self.handshake.ready

    @property
    def greeting(self) -> Hello | None:
        """Its hello, once it has said it (a spare's: its imports are done)."""
        return self.handshake.greeting

    @property
    def loaded(self) -> Ready | None:
        """Its ready, once its weights are loaded."""
        return self.handshake.loaded

    def status(self) -> None:
        return None  # one process: no ranks to list

    async def greet(self, init: Init, sup: SupervisorSettings) -> None:
        await wait_for(self.hello, sup.handshake_timeout_s,
                       E.LoadTimeout(f"no hello within handshake_timeout_s={sup.handshake_timeout_s}"))
        self.tell(init)

    async def load(self, sup: SupervisorSettings) -> None:
        await wait_for(self.ready, sup.load_timeout_s,
                       E.LoadTimeout(f"no ready within load_timeout_s={sup.load_timeout_s}"))

    @property
    def direct_requests(self) -> bool:
        """Its main thread reads requests and cancels itself (Hello.direct_requests)."""
        return self.greeting is not None and self.greeting.direct_requests

    def knows(self, tag: str) -> bool:
        """It serves messages of this tag beyond the first set (Hello.capabilities)."""
        return self.greeting is not None and tag in self.greeting.capabilities

    def tell(self, msg: Message) -> None:
        """A control message (Init, Shutdown, Adopt, ClearPrefixCache): to the worker's IO thread."""
        if self._hub is not None:
            self._hub.send(self.process.token, msg)

    def send(self, msg: Message) -> bool:
        """A request, or a cancel, which goes the way its request went: on one socket, so they are
        never reordered. False when the worker is gone."""
        if not self.process.alive or self._hub is None:
            return False
        rid = getattr(msg, "request_id", None)
        direct = self.direct_requests and rid not in self._via_io
        if not self._hub.send(self.process.token, msg, to_main=direct) and rid is not None:
            self._via_io.add(rid)
        return True

    def on_worker_message(self, msg: Message) -> None:
        """From the hub: handshake and heartbeats are the handle's; the rest is its owner's."""
        if self._on_handshake_or_beat(msg):
            return
        if isinstance(msg, (Final, Error, TokenCount, Embeddings, RerankScores)) and msg.request_id:
            self._via_io.discard(msg.request_id)  # its request is over: the id may come again
        self._owner.on_worker_result(self, msg)

    def on_worker_garbage(self, error: Exception) -> None:
        """A frame from its identity that breaks the protocol: no longer trusted. It is killed; its
        death is a counted WORKER_CRASHED, cause "protocol violation"."""
        if self.killed_for is not None or self.stopping:
            return  # already on its way out: its further frames change nothing
        self.log.error("worker.protocol_violation", error=str(error)[:500], worker_pid=self.process.pid)
        self.kill_for(E.ErrorCode.WORKER_CRASHED, f"protocol violation: {str(error)[:200]}")

    def _on_handshake_or_beat(self, msg: Message) -> bool:
        now = time.monotonic()
        if isinstance(msg, Heartbeat):
            self.last_heartbeat = now
            if msg.progress != self.progress or msg.phase != self.phase:
                self.progress_at = now
            self.progress, self.phase, self.memory = msg.progress, msg.phase, msg.memory
            self.cache = msg.cache
            self.available_at_beat = available_bytes()
        elif isinstance(msg, Hello):
            self.last_heartbeat = now
            self.handshake.said_hello(msg)
        elif isinstance(msg, Ready):
            if self.ready.done():
                pass
            elif msg.revision != self.cfg.revision:
                self.handshake.said_ready(E.LoadFailed(f"worker loaded revision {msg.revision}"))
            else:
                self.memory, self.cache = msg.memory, msg.cache
                self.available_at_beat = available_bytes()
                self.handshake.said_ready(msg)
        elif isinstance(msg, Error) and not msg.request_id:
            self.handshake.said_ready(msg.to_exc())
        else:
            return False
        return True

    # --- liveness and death --------------------------------------------------------------------

    def kill_for(self, code: E.ErrorCode, reason: str) -> None:
        """The supervisor's own verdict: SIGKILL the process group; the death is classified as `code`."""
        if self.process.alive and not self.stopping:
            self.killed_for = (code, reason)
            self.process.signal_group(signal.SIGKILL)

    def end_with_group(self) -> None:
        """Another rank of its group failed: SIGKILL now; its death is the group's, not its own."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self.process.alive:
            self.process.signal_group(signal.SIGKILL)

    def watch(self, sup: SupervisorSettings) -> None:
        """Start the liveness watch (once)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watching(sup), name=f"watch-{self.cfg.id}")

    async def _watching(self, sup: SupervisorSettings) -> None:
        """Heartbeats must keep coming; while prefilling or decoding, progress must move; memory
        must stay under the model's limit. A verdict kills the worker's process group."""
        while self.process.alive and not self.stopping:
            await asyncio.sleep(sup.heartbeat_interval_s)
            verdict = liveness_verdict(sup, time.monotonic(), self.last_heartbeat, self.phase,
                                       self.progress_at, self.memory, self.cfg.memory_limit_bytes)
            if verdict and self.process.alive and not self.stopping:
                self.log.error("worker.killed", code=verdict[0].code, reason=verdict[1], worker_pid=self.process.pid)
                self.kill_for(*verdict)
                return

    def _exited(self, rc: int | None) -> None:
        """Its process is gone. Unless we stopped it, the death is classified here, once, and fails
        the handshake (whoever awaits its hello or ready hears why); then its owner is told."""
        if self._watch is not None:
            self._watch.cancel()
        if not self.stopping:
            verdict = classify(rc, self.process.stderr_tail, killed_for=self.killed_for, last_memory=self.memory,
                               memory_limit_bytes=self.cfg.memory_limit_bytes)
            self.death = Death.of(verdict, self.process.pid)
            self.handshake.fail(self.death.error())
        self._owner.on_worker_exit(self, rc)

    async def close(self, reason: str, timeout_s: float) -> None:
        """The stop ladder (ask over the socket -> SIGTERM -> SIGKILL of the process group), then off
        the hub. Idempotent: a second call waits for the first. A worker already dead is closed
        at once, without yielding to the loop: a failure's handling goes on to BACKOFF before
        anyone can read the dead worker as serving."""
        if self._closed is None:
            self.stopping = True
            if self._watch is not None:
                self._watch.cancel()
            loop = asyncio.get_running_loop()
            if self.process.alive:
                self._closed = loop.create_task(self._stop_ladder(reason, timeout_s))
            else:
                self._unregister()
                self._closed = loop.create_future()
                self._closed.set_result(None)
        await asyncio.shield(self._closed)

    async def _stop_ladder(self, reason: str, timeout_s: float) -> None:
        try:
            await self.process.stop(reason, timeout_s, ask=lambda: self.tell(Shutdown(reason)))
        finally:
            self._unregister()

    def _unregister(self) -> None:
        if self._hub is not None:
            self._hub.unregister(self.process.token)
