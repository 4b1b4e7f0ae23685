"""The worker's life: handshake (HELLO -> INIT -> READY), load, then serve requests one at a time."""

from __future__ import annotations

import os
import queue
import sys
import time
import traceback

from protocol.errors import ErrorCode
from protocol.exitcodes import WorkerExit
from protocol.messages import (
    Cancel, Chunk, Error, Final, GenerateRequest, Hello, Init, Ready, Shutdown,
)
from worker.channel import Channel, Progress
from worker.log import log
from worker.pacing import Pacer

INIT_TIMEOUT_S = 60.0


def _apply_memory_limit(limit_bytes: int) -> None:
    """An address-space cap, set before mlx is imported so its allocations live under it."""
    if limit_bytes <= 0 or sys.platform != "linux":
        return
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    log("worker.memory_limit", limit_bytes=limit_bytes)


def _wait_init(channel: Channel) -> Init:
    deadline = time.monotonic() + INIT_TIMEOUT_S
    while True:
        try:
            msg = channel.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            log("worker.handshake_timeout", level="error", timeout_s=INIT_TIMEOUT_S)
            raise SystemExit(WorkerExit.HANDSHAKE) from None
        if isinstance(msg, Init):
            return msg
        if isinstance(msg, Shutdown):
            raise SystemExit(0)
        log("worker.unexpected_message", level="warning", type=msg.TAG)


def _serve(channel: Channel, engine, progress: Progress, stream_interval_s: float) -> int:
    from worker.engine import Cancelled

    while True:
        msg = channel.inbox.get()
        if isinstance(msg, Shutdown):
            log("worker.shutdown", reason=msg.reason)
            return 0
        if isinstance(msg, Cancel):
            # Its request has finished (a running one saw the flag, set as the cancel was read):
            # moot now, and not to be remembered.
            progress.cancelled.discard(msg.request_id)
            continue
        if not isinstance(msg, GenerateRequest):
            continue
        rid = msg.request_id
        progress.current = rid
        stream = _PacedStream(channel, rid, stream_interval_s)
        try:
            out = engine.generate(msg, stream.emit)
        except Cancelled:
            channel.send(Error(rid, ErrorCode.CANCELLED.code, "cancelled by client"))
        except Exception as exc:  # a request-level failure: report it, keep serving
            stream.flush()
            log("worker.generate_failed", level="error", request_id=rid, error=repr(exc),
                traceback=traceback.format_exc(limit=5))
            channel.send(Error(rid, ErrorCode.INTERNAL.code, f"generation failed: {exc!r}"))
        else:
            stream.flush()
            usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
            channel.send(Final(rid, out.text, out.finish_reason, usage, out.timings))
        finally:
            progress.cancelled.discard(rid)
            progress.current = None
            progress.phase = "idle"


class _PacedStream:
    """One-at-a-time serving's chunks, paced like the batch's (worker.pacing): the first at once,
    then what comes within the interval goes together."""

    def __init__(self, channel: Channel, rid: str, interval_s: float) -> None:
        self._channel, self._rid = channel, rid
        self._pacer = Pacer(interval_s)
        self._text: list[str] = []
        self._tokens = 0
        self._last = time.monotonic()

    def emit(self, text: str, tokens: int) -> None:
        self._channel.inbox.pump()  # a cancel for this request marks it before the next token
        now = time.monotonic()
        gap, self._last = now - self._last, now
        self._text.append(text)
        self._tokens += tokens
        if not self._pacer.hold(now, gap):
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._text or self._tokens:
            self._channel.send(Chunk(self._rid, "".join(self._text), self._tokens))
            self._text, self._tokens = [], 0
            self._pacer.sent(time.monotonic() if now is None else now)


def _serve_batched(channel: Channel, batcher, progress: Progress) -> int:
    """Continuous batching: between steps, take every waiting message (new requests join the batch,
    cancels leave it before the next step); block only when nothing is generating."""
    inbox = channel.inbox
    while True:
        msg = inbox.get() if not len(batcher) else inbox.poll()
        if progress.cancel_all:  # orphaned: nobody is left to read the streams begun before
            progress.cancel_all = False
            batcher.cancel_all()
        while msg is not None:
            if isinstance(msg, Shutdown):
                log("worker.shutdown", reason=msg.reason)
                return 0
            if isinstance(msg, Cancel):
                progress.cancelled.discard(msg.request_id)
                batcher.cancel(msg.request_id)
            elif isinstance(msg, GenerateRequest):
                batcher.add(msg)
            msg = inbox.poll()
        if len(batcher):
            batcher.step()


def main() -> int:
    endpoint = os.environ["LMX_WORKER_ENDPOINT"]
    token = os.environ["LMX_WORKER_TOKEN"]
    model_id = os.environ.get("LMX_MODEL_ID", "?")
    death_fd = int(os.environ["LMX_DEATH_FD"]) if os.environ.get("LMX_DEATH_FD") else None
    progress = Progress()
    channel = Channel(endpoint, token, death_fd, progress)
    if os.environ.get("LMX_WORKER_SPARE"):
        # A warm spare: pay the interpreter's and mlx-lm's imports now, then say hello; a model
        # assigned later costs only its load and canary.
        start = time.monotonic()
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401

        log("worker.spare_ready", import_s=round(time.monotonic() - start, 3))
    channel.start(Hello(token, os.getpid(), model_id, {"python": sys.version.split()[0]}, direct_requests=True))
    init = _wait_init(channel)
    if model_id != init.model_id:
        from worker import log as worker_log

        worker_log.assign(init.model_id)
    _apply_memory_limit(init.memory_limit_bytes)
    progress.phase = "loading"
    try:
        from worker.engine import Engine

        engine = Engine(progress)
        if init.memory_limit_bytes > 0 and sys.platform == "darwin":
            # No address-space cap on macOS (Metal memory is not in it): mlx's own limit instead,
            # and the supervisor's watchdog on the reported footprint.
            engine.set_memory_limit(init.memory_limit_bytes)
        log("worker.loading", path=init.path, revision=init.revision, **engine.versions())
        load_s = engine.load(init.path)
    except Exception as exc:
        log("worker.load_failed", level="error", error=repr(exc), traceback=traceback.format_exc(limit=8))
        channel.send(Error(None, ErrorCode.LOAD_FAILED.code, f"load failed: {exc!r}"))
        _flush_and_exit(WorkerExit.LOAD_FAILED)
    progress.memory = engine.memory
    progress.phase = "idle"
    progress.revision = init.revision
    log("worker.loaded", revision=init.revision, load_s=round(load_s, 3))
    channel.send(Ready(init.revision, load_s, engine.memory()))
    if init.max_batch_size > 1:
        from worker.batch import Batcher

        batcher = Batcher(engine, progress, channel.send, init.max_batch_size, init.prefill_step_size,
                          init.stream_interval_s)
        return _serve_batched(channel, batcher, progress)
    return _serve(channel, engine, progress, init.stream_interval_s)


def _flush_and_exit(code: int) -> None:
    # Give the IO thread a moment to put the error on the wire before the process ends.
    time.sleep(0.2)
    raise SystemExit(code)
