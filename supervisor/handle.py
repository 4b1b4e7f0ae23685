"""What the supervisor knows of one live worker: its process, handshake futures, heartbeat state,
and the liveness watch that kills it when it stops doing its job."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from protocol import errors as E
from protocol.messages import Error, Heartbeat, Hello, Message, Ready
from protocol.phase import Phase
from supervisor.classify import Verdict
from supervisor.config import ModelConfig, SupervisorSettings
from supervisor.liveness import liveness_verdict
from supervisor.memory import available_bytes
from supervisor.process import WorkerProcess


async def wait_for(fut: asyncio.Future, timeout_s: float, on_timeout: E.LmxError) -> Any:
    """Await a handshake future with a deadline; the future itself survives a timeout."""
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
    except asyncio.TimeoutError:
        raise on_timeout from None


class Worker:
    def __init__(self, process: WorkerProcess, cfg: ModelConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.process = process
        self.cfg = cfg
        self.hello: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()
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
        self.death: Verdict | None = None
        self.death_request: str | None = None  # the request on the worker when it died
        # Requests sent through its IO thread (its main thread's socket not heard from yet): their
        # cancels go the same way, so a cancel never overtakes its request.
        self.via_io: set[str] = set()

    @property
    def direct_requests(self) -> bool:
        """Its main thread reads requests and cancels itself (Hello.direct_requests)."""
        hello = self.hello
        return hello.done() and not hello.cancelled() and hello.exception() is None and hello.result().direct_requests

    def on_message(self, msg: Message) -> bool:
        """Handshake and heartbeat messages; False for what belongs to a request."""
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
            if not self.hello.done():
                self.hello.set_result(msg)
        elif isinstance(msg, Ready):
            if self.ready.done():
                pass
            elif msg.revision != self.cfg.revision:
                self.ready.set_exception(E.LoadFailed(f"worker loaded revision {msg.revision}"))
            else:
                self.memory = msg.memory
                self.available_at_beat = available_bytes()
                self.ready.set_result(msg)
        elif isinstance(msg, Error) and not msg.request_id:
            if not self.ready.done():
                self.ready.set_exception(msg.to_exc())
        else:
            return False
        return True

    def fail_handshake(self, exc: E.LmxError) -> None:
        for fut in (self.hello, self.ready):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # whoever awaits it gets exc; nobody awaiting is not an error

    def kill_for(self, code: E.ErrorCode, reason: str) -> None:
        """The supervisor's own verdict: SIGKILL the process group; the death is classified as `code`."""
        if self.process.alive and not self.stopping:
            self.killed_for = (code, reason)
            self.process.signal_group(signal.SIGKILL)

    async def watch(self, sup: SupervisorSettings, log: Any) -> None:
        """Heartbeats must keep coming; while prefilling or decoding, progress must move; memory
        must stay under the model's limit. A verdict kills the worker's process group."""
        while self.process.alive and not self.stopping:
            await asyncio.sleep(sup.heartbeat_interval_s)
            verdict = liveness_verdict(sup, time.monotonic(), self.last_heartbeat, self.phase,
                                       self.progress_at, self.memory, self.cfg.memory_limit_bytes)
            if verdict and self.process.alive and not self.stopping:
                self.killed_for = verdict
                log.error("worker.killed", code=verdict[0].code, reason=verdict[1], worker_pid=self.process.pid)
                self.process.signal_group(signal.SIGKILL)
                return
