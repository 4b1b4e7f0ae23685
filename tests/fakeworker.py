"""An in-process Worker and WorkerFactory (supervisor.workers.worker, .factory) for lifecycle tests:
no process, no hub, no mlx, so a lifecycle decision is tested in milliseconds. A test scripts what a
FakeWorker does (its hello, its ready, its answers, its death) and reads what it was sent and told;
a FakeFactory hands them out and records what was asked of it.

    factory = FakeFactory()
    rt = ModelRuntime(cfg, services, factory=factory)    # a lifecycle that takes a factory
    factory.next_worker(ready=False)                      # the next one loads until told
    ...; w = factory.last; w.say_ready(); w.die(E.ErrorCode.WORKER_OOM, "bad_alloc")

What a FakeWorker does on its own, one loop step later (never inside the call that caused it, as a
real worker's messages come from the hub): its hello after it is made (`hello=True`), its ready after
its Init (`ready=True`), and each request's answer (`answer`). Its exit reaches its owner as a real
worker's does: `die()` (a death: the handshake fails with its error) or `close()` (no death)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from protocol import errors as E
from protocol.messages import Adopt, CountTokens, Final, GenerateRequest, Hello, Init, Message, Ready, TokenCount
from protocol.phase import Phase
from supervisor.config import Config, ModelConfig, SupervisorSettings
from supervisor.persistence.records import WorkerRecord
from supervisor.workers.classify import Verdict, exit_details
from supervisor.workers.worker import Death, Handshake, Owner, wait_for

__all__ = ["FakeFactory", "FakeProcess", "FakeWorker", "answer_final"]

_pids = itertools.count(40_000)
Answer = Callable[[Message], list[Message]]


def answer_final(text: str = "ok", tokens: int = 1) -> Answer:
    """Every generation ends at once with `text` (`tokens` long); a count is 3 tokens."""

    def answer(msg: Message) -> list[Message]:
        if isinstance(msg, GenerateRequest):
            return [Final(msg.request_id, text, "stop", {"prompt_tokens": 3, "completion_tokens": tokens})]
        if isinstance(msg, CountTokens):
            return [TokenCount(msg.request_id, 3)]
        return []

    return answer


@dataclass
class FakeHost:
    """The Host a real WorkerHandle or RankGroup is built on in-process: no hub, no log dir."""
    config: Config
    state_dir: Path
    hub: None = None
    worker_endpoint: str = "ipc://unused"
    log_dir: Path | None = None


@dataclass
class FakeProcess:
    """What a status and a crash record read of a worker's process (supervisor.workers.worker.ProcessView)."""

    pid: int | None
    token: str
    start_time: float | None = field(default_factory=time.time)
    stderr_tail: list[str] = field(default_factory=list)
    alive: bool = True


class FakeWorker:
    """A Worker in this process. `hello`/`ready`: say them on their own (True), or wait for
    `say_hello()`/`say_ready()` (False); `ready` may be an LmxError: the load fails with it. `answer`:
    what a request gets back (None: nothing, it stays in flight). `ranks`: a group of that many
    ranks (its `status()` lists them)."""

    def __init__(self, cfg: ModelConfig, owner: Owner, *, pid: int | None = None, token: str | None = None,
                 hello: bool = True, ready: bool | E.LmxError = True, answer: Answer | None = answer_final(),
                 capabilities: tuple[str, ...] = ("count_tokens",), ranks: int = 0) -> None:
        self.cfg, self.owner = cfg, owner
        pid = next(_pids) if pid is None else pid
        self.process = FakeProcess(pid, token or f"token-{pid}")
        self.handshake = Handshake()
        self.stopping = False
        self.death: Death | None = None
        self.memory: dict = {}
        self.cache: dict = {}
        self.available_at_beat: int | None = None
        self.phase: str = Phase.STARTING
        self.progress = 0
        self.answer = answer
        self.capabilities = capabilities
        self.ranks = ranks
        self._ready = ready
        self.sent: list[Message] = []  # every send(), in order (a refused one too: see `refused`)
        self.refused: list[Message] = []  # the sends it answered False (it was gone or stopping)
        self.told: list[Message] = []  # every tell(), Init included
        self.closes: list[str] = []  # the reason of each close() call (a second one changes nothing)
        self.watched = False  # watch() was called (a rank's group starts its watch)
        if hello:
            asyncio.get_running_loop().call_soon(self.say_hello)

    # --- what the test scripts -------------------------------------------------------------------

    def say_hello(self) -> None:
        self.handshake.said_hello(Hello(self.process.token, self.process.pid or 0, self.cfg.id,
                                        direct_requests=True, capabilities=list(self.capabilities)))

    def say_ready(self, load_s: float = 0.5, memory: dict | None = None) -> None:
        self.memory = dict(memory or {"rss_bytes": 1 << 20})
        self.phase = Phase.IDLE
        self.handshake.said_ready(Ready(self.cfg.revision, load_s, self.memory))

    def fail_load(self, exc: E.LmxError) -> None:
        """The load fails with an error the worker sent (it lives on: no death)."""
        self.handshake.said_ready(exc)

    def beat(self, phase: str = Phase.IDLE, progress: int | None = None, memory: dict | None = None) -> None:
        self.phase, self.progress = phase, self.progress + 1 if progress is None else progress
        self.memory = dict(memory) if memory is not None else self.memory

    def reply(self, msg: Message) -> None:
        """A result (Chunk, Final, Error, TokenCount) to its owner, now."""
        self.owner.on_worker_result(self, msg)

    def die(self, code: E.ErrorCode = E.ErrorCode.WORKER_CRASHED, cause: str = "killed by SIGKILL", *,
            rc: int | None = -9, victim: bool = False, rank: int | None = None, host: str | None = None) -> None:
        """It dies unasked (a group's: its rank `rank` on `host` did): its death, its handshake failed
        with the death's error, then its owner told. Not while stopping: then its exit is no death."""
        if not self.process.alive:
            return
        self.process.alive = False
        if not self.stopping:
            details = exit_details(rc)
            where = None
            if rank is not None:
                details.update(rank=rank, host=host)
                where = f"rank {rank} on {host}"
            self.death = Death.of(Verdict(code, cause, victim, details), self.process.pid, where=where)
            self.handshake.fail(self.death.error())
        self.owner.on_worker_exit(self, rc)

    # --- the Worker protocol ---------------------------------------------------------------------

    @property
    def loaded(self) -> Any:
        return self.handshake.loaded

    def knows(self, tag: str) -> bool:
        greeting = self.handshake.greeting
        return greeting is not None and tag in greeting.capabilities

    def status(self) -> list[dict[str, Any]] | None:
        if not self.ranks:
            return None
        return [{"rank": i, "host": "local", "address": f"127.0.0.1:{5000 + i}", "pid": self.process.pid,
                 "state": self.phase if self.process.alive else "exited", "memory": dict(self.memory)}
                for i in range(self.ranks)]

    async def greet(self, init: Init, sup: SupervisorSettings) -> None:
        await wait_for(self.handshake.hello, sup.handshake_timeout_s,
                       E.LoadTimeout(f"no hello within handshake_timeout_s={sup.handshake_timeout_s}"))
        self.tell(init)

    async def load(self, sup: SupervisorSettings) -> None:
        await wait_for(self.handshake.ready, sup.load_timeout_s,
                       E.LoadTimeout(f"no ready within load_timeout_s={sup.load_timeout_s}"))

    def send(self, msg: Message) -> bool:
        self.sent.append(msg)
        if not self.process.alive or self.stopping:
            self.refused.append(msg)
            return False
        if self.answer is not None:
            for result in self.answer(msg):
                asyncio.get_running_loop().call_soon(self._deliver, result)
        return True

    def _deliver(self, result: Message) -> None:
        if self.process.alive and not self.stopping:
            self.reply(result)

    def tell(self, msg: Message) -> None:
        self.told.append(msg)
        if isinstance(msg, Init):
            self.phase = Phase.LOADING
            if isinstance(self._ready, E.LmxError):
                asyncio.get_running_loop().call_soon(self.fail_load, self._ready)
            elif self._ready:
                asyncio.get_running_loop().call_soon(self.say_ready)

    async def close(self, reason: str, timeout_s: float) -> None:
        """Idempotent. A live worker exits (its owner hears it, with no death) before this returns."""
        self.closes.append(reason)
        if self.stopping:
            return
        self.stopping = True
        if self.process.alive:
            self.process.alive = False
            self.owner.on_worker_exit(self, 0)

    @property
    def closed(self) -> bool:
        return self.stopping and not self.process.alive

    # --- as a rank of a real RankGroup (supervisor.workers.worker.GroupMember) -------------------

    def watch(self, sup: SupervisorSettings) -> None:
        self.watched = True

    def end_with_group(self) -> None:
        """Another rank failed: SIGKILLed now; its exit is the group's death, not its own."""
        self.stopping = True
        if self.process.alive:
            self.process.alive = False
            self.owner.on_worker_exit(self, -9)


@dataclass
class _Adoption:
    present: bool = True  # pid and start time still match the record
    why: str | None = None  # None: it proves itself; else the refusal


class FakeFactory:
    """A WorkerFactory of FakeWorkers. Records every call; `next_worker(**kw)` shapes the next worker
    made (FakeWorker's keywords), `fail_next_spawn(exc)` makes the next spawn or group raise,
    `next_adoption(...)` decides the next adoption. `spares`: warm spares it has to give (a spawn of a
    standard-worker model takes one while any are left)."""

    def __init__(self, spares: int = 0, **worker_kw: Any) -> None:
        self.spares = spares
        self.worker_kw = worker_kw  # every worker's keywords, unless next_worker says otherwise
        self.workers: list[FakeWorker] = []  # every worker handed out, in order
        self.spawns: list[str] = []  # model ids given a new process
        self.spares_taken: list[str] = []  # model ids given a warm spare
        self.groups: list[str] = []  # model ids whose group was placed
        self.adoptions: list[int] = []  # recorded pids an adoption was tried for
        self.proofs: list[tuple[int | None, str | None]] = []  # (pid, refusal or None) of each prove()
        self.orphans_ended: list[tuple[int, str]] = []  # (pid, why)
        self._next: list[dict[str, Any]] = []
        self._fail: list[BaseException] = []
        self._adoptions: list[_Adoption] = []

    @property
    def last(self) -> FakeWorker:
        return self.workers[-1]

    def next_worker(self, **kw: Any) -> None:
        self._next.append(kw)

    def fail_next_spawn(self, exc: BaseException) -> None:
        self._fail.append(exc)

    def next_adoption(self, present: bool = True, why: str | None = None) -> None:
        self._adoptions.append(_Adoption(present, why))

    def _make(self, cfg: ModelConfig, owner: Owner, **kw: Any) -> FakeWorker:
        worker = FakeWorker(cfg, owner, **{**self.worker_kw, **(self._next.pop(0) if self._next else {}), **kw})
        self.workers.append(worker)
        return worker

    def _raise_if_told(self) -> None:
        if self._fail:
            raise self._fail.pop(0)

    # --- the WorkerFactory protocol ------------------------------------------------------------

    def init(self, cfg: ModelConfig) -> Init:
        return Init(cfg.id, cfg.revision, cfg.path, 1.0, 60.0, cfg.memory_limit_bytes, cfg.max_batch_size,
                    cfg.prefill_step_size, cfg.stream_interval_s, context_tokens=cfg.context_tokens)

    def spawn(self, cfg: ModelConfig, owner: Owner) -> FakeWorker:
        self._raise_if_told()
        if self.spares > 0 and cfg.worker_command is None:
            self.spares -= 1
            self.spares_taken.append(cfg.id)
        else:
            self.spawns.append(cfg.id)
        return self._make(cfg, owner)

    def place_group(self, cfg: ModelConfig, owner: Owner, init: Init) -> FakeWorker:
        self._raise_if_told()
        self.groups.append(cfg.id)
        size = cfg.group.size if cfg.group is not None else 2
        return self._make(cfg, owner, ranks=size)

    def adopt(self, record: WorkerRecord, cfg: ModelConfig, owner: Owner) -> FakeWorker | None:
        self.adoptions.append(record.pid)
        if self._adoptions and not self._adoptions[0].present:
            self._adoptions.pop(0)
            return None
        worker = self._make(cfg, owner, pid=record.pid, token=record.token, ready=False)
        worker.process.start_time = record.start_time
        return worker

    async def prove(self, worker: Any, record: WorkerRecord, revision: str) -> str | None:
        why = self._adoptions.pop(0).why if self._adoptions else None
        if why is None and record.revision != revision:
            why = f"revision {record.revision} is no longer wanted (want {revision})"
        self.proofs.append((worker.process.pid, why))
        if why is None:
            worker.tell(Adopt(1, 0.0))
        return why

    def end_orphan(self, record: WorkerRecord, cfg: ModelConfig, why: str) -> None:
        self.orphans_ended.append((record.pid, why))
