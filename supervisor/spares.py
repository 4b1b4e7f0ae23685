"""Warm spares: worker processes started ahead of need, with the interpreter up and mlx-lm imported,
waiting for a model. A model that starts (or restarts after a crash) takes one and pays only its
load and canary. Spares are plain workers: they run no model code until assigned, and the pool
refills itself after every take."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from protocol.messages import Hello, Message, Shutdown
from supervisor import logs
from supervisor.config import ModelConfig
from supervisor.hub import WorkerHub
from supervisor.process import WorkerProcess

SPARE_ID = "spare"
# A spare that dies this soon after its start is not replaced at once (no spawn loop).
REFILL_BACKOFF_S = 5.0


class Spare:
    """A started worker waiting for a model; the hub routes its messages here until it is taken."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.hello: Hello | None = None
        self.started = time.monotonic()

    def on_worker_message(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self.hello = msg

    def on_worker_garbage(self, error: Exception) -> None:
        self.process.signal_group(9)  # not trusted with a model


class SparePool:
    def __init__(self, size: int, hub: WorkerHub, endpoint: str, log_dir: Path | None,
                 hub_downloads: bool) -> None:
        self.size = size
        self._hub = hub
        self._endpoint = endpoint
        self._log_dir = log_dir
        self._hub_downloads = hub_downloads
        self._spares: dict[str, Spare] = {}
        self._closed = False
        self._refill: asyncio.TimerHandle | None = None
        self.log = logs.get(model=SPARE_ID)

    def fill(self) -> None:
        self._refill = None
        while not self._closed and len(self._spares) < self.size:
            self._spawn()

    def _spawn(self) -> None:
        token = secrets.token_hex(16)
        cfg = ModelConfig(id=SPARE_ID, path="")
        process = WorkerProcess(cfg, self._endpoint, token, asyncio.get_running_loop(), self._on_exit,
                                self._log_dir, hub_downloads=self._hub_downloads, spare=True)
        spare = Spare(process)
        self._spares[token] = spare
        self._hub.register(token, spare)
        process.spawn()

    def take(self) -> Spare | None:
        """A spare that has said hello (imports done), or None: then the caller spawns a worker."""
        for token, spare in self._spares.items():
            if spare.hello is not None and spare.process.alive:
                del self._spares[token]
                self._hub.unregister(token)
                self.log.info("worker.spare_taken", worker_pid=spare.process.pid)
                if not self._closed and self._refill is None:
                    self._refill = asyncio.get_running_loop().call_soon(self.fill)
                return spare
        return None

    def _on_exit(self, process: WorkerProcess, rc: int | None) -> None:
        spare = self._spares.pop(process.token, None)
        if spare is None or self._closed:
            return
        self._hub.unregister(process.token)
        self.log.warning("worker.spare_died", worker_pid=process.pid, exit_code=rc)
        if self._refill is None:
            delay = REFILL_BACKOFF_S if time.monotonic() - spare.started < REFILL_BACKOFF_S else 0.0
            self._refill = asyncio.get_running_loop().call_later(delay, self.fill)

    @property
    def ready(self) -> int:
        return sum(1 for s in self._spares.values() if s.hello is not None)

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
        spares = list(self._spares.values())
        self._spares.clear()
        await asyncio.gather(*(s.process.stop(
            "supervisor stopping", timeout_s, lambda s=s: self._hub.send(s.process.token, Shutdown("stop")))
            for s in spares))
        for s in spares:
            self._hub.unregister(s.process.token)
