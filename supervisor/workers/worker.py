"""What a worker is to whoever owns it: the `Worker` protocol every kind implements (a local process,
a group of ranks, a rank on a peer), its one `Handshake`, its one `Death`, and the `Owner` it calls
back. Nothing here does IO: the kinds do (handle.py, group.py, remoterank.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

from protocol import errors as E
from protocol.messages import Message
from supervisor.workers.classify import Verdict

if TYPE_CHECKING:
    from supervisor.config import Config, SupervisorSettings
    from supervisor.workers.hub import WorkerHub

__all__ = ["Death", "GroupMember", "Handshake", "Host", "Owner", "ProcessView", "Worker", "wait_for"]


def _settle(fut: asyncio.Future, outcome: Any) -> bool:
    """Resolve `fut` with a result, or fail it with an exception marked retrieved (whoever awaits it
    hears it; nobody awaiting is not an error). False when it was already done."""
    if fut.done():
        return False
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
        fut.exception()
    else:
        fut.set_result(outcome)
    return True


async def wait_for(fut: asyncio.Future, timeout_s: float, on_timeout: E.LmxError) -> Any:
    """Await a handshake future with a deadline; the future itself survives a timeout."""
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
    except asyncio.TimeoutError:
        raise on_timeout from None


def _outcome(fut: asyncio.Future) -> Any:
    """A future's result, or None while pending or when it failed."""
    return fut.result() if fut.done() and not fut.cancelled() and fut.exception() is None else None


class Handshake:
    """A worker's two steps up, as futures: its hello (it is there), then its ready (weights loaded).
    Each is settled once; a death fails whichever is still pending (`fail`)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()

    @property
    def greeting(self) -> Any:
        """What its hello said, once it has said it (a Hello; a peer's rank: its report)."""
        return _outcome(self.hello)

    @property
    def loaded(self) -> Any:
        """What its ready said (a Ready, or what stands for one: `.load_s`), once loaded."""
        return _outcome(self.ready)

    def said_hello(self, outcome: Any) -> bool:
        """The hello step's outcome (its hello, or the error it failed with); False if already settled."""
        return _settle(self.hello, outcome)

    def said_ready(self, outcome: Any) -> bool:
        """The ready step's outcome (its ready, or the error it failed with); False if already settled."""
        return _settle(self.ready, outcome)

    def fail(self, exc: BaseException) -> None:
        """Both steps still pending fail with `exc`, marked retrieved."""
        _settle(self.hello, exc)
        _settle(self.ready, exc)


@dataclasses.dataclass(frozen=True)
class Death(Verdict):
    """A worker's death as one value: the classify verdict (code, cause, victim, details), the pid
    that died, and how its error reads. `where` names a group's rank ("rank 1 on b"); `reported`: the
    verdict came from a peer's report, whose cause is the whole message."""

    pid: int | None = None
    where: str | None = None
    reported: bool = False

    @classmethod
    def of(cls, verdict: Verdict, pid: int | None, **how: Any) -> "Death":
        fields = {f.name: getattr(verdict, f.name) for f in dataclasses.fields(Verdict)}
        return cls(**fields, pid=pid, **how)

    def error(self) -> E.LmxError:
        """The typed error the death is (WORKER_CRASHED, WORKER_OOM, PEER_UNAVAILABLE, ...)."""
        message = self.cause if self.reported else self.message(self.pid)
        if self.where is not None:
            message = f"{self.where}: {message}"
        return E.error_class(self.code)(message, worker_pid=self.pid, cause=self.cause, **self.details)


@runtime_checkable
class ProcessView(Protocol):
    """What a status, a crash record and the adoption record read of a worker's process."""

    @property
    def pid(self) -> int | None: ...

    @property
    def start_time(self) -> float | None: ...

    @property
    def token(self) -> str: ...

    @property
    def stderr_tail(self) -> Iterable[str]: ...

    @property
    def alive(self) -> bool: ...


@runtime_checkable
class Worker(Protocol):
    """A model's worker, whatever its kind. Its owner hears of results and its exit through `Owner`;
    it reads the rest here. `death` is set once, when it died unasked (never after `close`)."""

    process: ProcessView
    handshake: Handshake
    stopping: bool
    death: Death | None

    # its figures, from its last heartbeat (or its ready)
    @property
    def memory(self) -> dict: ...

    @property
    def cache(self) -> dict: ...

    @property
    def available_at_beat(self) -> int | None: ...

    @property
    def phase(self) -> str: ...

    @property
    def progress(self) -> int: ...

    @property
    def loaded(self) -> Any: ...

    def knows(self, tag: str) -> bool:
        """It serves messages of this tag beyond the first set (Hello.capabilities)."""

    def status(self) -> list[dict[str, Any]] | None:
        """A group's ranks for lmxctl status; None for a single worker."""

    async def greet(self, init: Any, sup: "SupervisorSettings") -> None:
        """Its hello (within handshake_timeout_s), then its Init: LoadTimeout, or its death's error."""

    async def load(self, sup: "SupervisorSettings") -> None:
        """Its ready (within load_timeout_s): LoadTimeout, the error it sent, or its death's error."""

    def send(self, msg: Message) -> bool:
        """A request, a cancel or a prefix-cache clear, on the way its requests take; False when gone."""

    def tell(self, msg: Message) -> None:
        """A control message (Shutdown, Adopt, ClearPrefixCache) that must reach every rank."""

    async def close(self, reason: str, timeout_s: float) -> None:
        """The stop ladder; idempotent. Its exit is then no death."""


@runtime_checkable
class GroupMember(Worker, Protocol):
    """One rank as its group drives it: also watched, and ended when another rank failed."""

    def watch(self, sup: "SupervisorSettings") -> None: ...

    def end_with_group(self) -> None: ...


class Owner(Protocol):
    """Who a worker works for (a model's runtime, a group, the spare pool, a peer's placed rank)."""

    def on_worker_result(self, worker: Any, msg: Message) -> None: ...

    def on_worker_exit(self, worker: Any, rc: int | None) -> None: ...


class Host(Protocol):
    """What a worker needs of the supervisor that runs it (supervisor.services.Services has it all):
    the hub, where workers connect, where their logs go, and the config, read afresh each time (a
    reload replaces it)."""

    @property
    def hub(self) -> "WorkerHub | None": ...

    @property
    def worker_endpoint(self) -> str: ...

    @property
    def log_dir(self) -> Path | None: ...

    @property
    def state_dir(self) -> Path | None: ...

    @property
    def config(self) -> "Config": ...
