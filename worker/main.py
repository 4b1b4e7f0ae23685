"""The worker's life: handshake (HELLO -> INIT -> READY), load, then serve requests (worker.batch)."""

from __future__ import annotations

import os
import queue
import sys
import time
import traceback

from protocol.errors import ErrorCode
from protocol.exitcodes import WorkerExit
from protocol.messages import (
    Cancel, ClearPrefixCache, CountTokens, EmbedRequest, Error, GenerateRequest, Hello, Init, Ready, RerankRequest,
    Shutdown,
)
from protocol.phase import Phase
from worker.channel import Channel, Progress
from worker.log import log

# A worker spawned for a model gets Init right after its hello; one that waits this long was
# forgotten. Not for a warm spare (see _wait_init).
INIT_TIMEOUT_S = 60.0
# What this worker serves beyond generate and cancel (Hello.capabilities): the supervisor refuses a
# worker from before a message that message, rather than send what it would drop.
CAPABILITIES = ("count_tokens", "embed", "rerank")
# The kinds whose engine is an encoder of this package's own (worker.embed, worker.rerank): no mlx_lm.
ENCODERS = ("embed", "rerank")


def _apply_memory_limit(limit_bytes: int) -> None:
    """An address-space cap, set before mlx is imported so its allocations live under it."""
    if limit_bytes <= 0 or sys.platform != "linux":
        return
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    log("worker.memory_limit", limit_bytes=limit_bytes)


def _wait_init(channel: Channel) -> Init:
    # A warm spare waits for its model as long as its supervisor lives: the death pipe's orphan
    # timer (worker.channel) ends it once the supervisor is gone. With a timeout here every spare
    # exited after a minute and was spawned again, mlx imports and all, forever.
    timeout_s = float(os.environ.get("LMX_WORKER_HANDSHAKE_TIMEOUT_S") or INIT_TIMEOUT_S)
    deadline = None if os.environ.get("LMX_WORKER_SPARE") else time.monotonic() + timeout_s
    while True:
        try:
            msg = channel.inbox.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            log("worker.handshake_timeout", level="error", timeout_s=timeout_s)
            raise SystemExit(WorkerExit.HANDSHAKE) from None
        if isinstance(msg, Init):
            return msg
        if isinstance(msg, Shutdown):
            raise SystemExit(0)
        log("worker.unexpected_message", level="warning", type=msg.TAG)


def _serve(channel: Channel, batcher, progress: Progress) -> int:
    """Between steps, take every waiting message (new requests join the batch, cancels leave it
    before the next step); block only when nothing is generating."""
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
            try:
                _handle(batcher, msg)
            except Exception as exc:  # one request's failure is its own: never the serve loop's
                _refuse(channel, msg, exc)
            msg = inbox.poll()
        if len(batcher):
            batcher.step()


def _handle(batcher, msg) -> None:
    if isinstance(msg, Cancel):
        batcher.cancel(msg.request_id)
    elif isinstance(msg, ClearPrefixCache):
        log("worker.prefix_cache_cleared", **batcher.prefix.clear())
    elif isinstance(msg, (GenerateRequest, EmbedRequest, RerankRequest)):
        if not isinstance(msg, getattr(batcher, "SERVES", GenerateRequest)):  # the supervisor routes by kind
            raise ValueError(f"this worker's model is of another kind: it does not serve {msg.TAG} requests")
        batcher.add(msg)
    elif isinstance(msg, CountTokens):  # answered now: it never waits behind generations
        batcher.count(msg)


def _refuse(channel: Channel, msg, exc: Exception) -> None:
    rid = getattr(msg, "request_id", None)
    log("worker.request_failed", level="error", type=msg.TAG, request_id=rid, error=repr(exc)[:500],
        traceback=traceback.format_exc(limit=8))
    if rid is not None and isinstance(msg, (GenerateRequest, CountTokens, EmbedRequest, RerankRequest)):
        channel.send(Error(rid, ErrorCode.BAD_REQUEST.code, f"cannot serve this request: {str(exc)[:500]}"))


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
    channel.start(Hello(token, os.getpid(), model_id, {"python": sys.version.split()[0]}, direct_requests=True,
                        capabilities=list(CAPABILITIES)))
    init = _wait_init(channel)
    if model_id != init.model_id:
        from worker import log as worker_log

        worker_log.assign(init.model_id)
    _apply_memory_limit(init.memory_limit_bytes)
    progress.phase = Phase.LOADING
    engine, group, load_s = _load(init, channel, progress, death_fd)
    progress.memory = engine.memory
    engine.progress = progress  # a chat template renders under PREFILL (worker.render)
    progress.phase = Phase.IDLE
    progress.revision = init.revision
    log("worker.loaded", revision=init.revision, load_s=round(load_s, 3))
    if init.kind in ENCODERS:
        channel.send(Ready(init.revision, load_s, engine.memory(), {}))
        return _serve(channel, engine.batcher(progress, channel.send), progress)
    if group is not None:
        from worker.group import GroupBatcher

        channel.send(Ready(init.revision, load_s, engine.memory(), {}))
        return _serve(channel, GroupBatcher(engine, progress, channel.send, group, init.prefill_step_size,
                                            init.stream_interval_s, init.context_tokens), progress)
    prefix = _prefix_cache(init, engine)
    progress.cache = prefix.stats if prefix.enabled else dict
    channel.send(Ready(init.revision, load_s, engine.memory(), progress.cache()))
    from worker.batch import Batcher

    batcher = Batcher(engine, progress, channel.send, max(1, init.max_batch_size), init.prefill_step_size,
                      init.stream_interval_s, prefix, init.context_tokens)
    return _serve(channel, batcher, progress)


def _load(init: Init, channel: Channel, progress: Progress, death_fd: int | None):
    """(the engine, the group or None, load seconds); exits LOAD_FAILED (after saying why) if not."""
    try:
        if init.kind == "embed":  # its own encoder: no mlx_lm import to pay for
            from worker.embed import EmbedEngine as Engine
        elif init.kind == "rerank":
            from worker.rerank import RerankEngine as Engine
        else:
            from worker.engine import Engine
        engine = Engine()
        if init.memory_limit_bytes > 0 and sys.platform == "darwin":
            # No address-space cap on macOS (Metal memory is not in it): mlx's own limit instead,
            # and the supervisor's watchdog on the reported footprint.
            engine.set_memory_limit(init.memory_limit_bytes)
        log("worker.loading", path=init.path, revision=init.revision, **engine.versions())
        if init.group:
            from worker import group as ranks

            group, load_s = ranks.join_and_load(engine, init, channel, progress, death_fd)
            return engine, group, load_s
        return engine, None, engine.load(init.path)
    except Exception as exc:
        log("worker.load_failed", level="error", error=repr(exc), traceback=traceback.format_exc(limit=8))
        channel.send(Error(None, ErrorCode.LOAD_FAILED.code, f"load failed: {exc!r}"))
        _flush_and_exit(WorkerExit.LOAD_FAILED)
        raise


def _prefix_cache(init: Init, engine):
    """The prefix cache, within the model's memory limit: at most half of what the loaded weights
    leave under it (the other half is for the KV of the requests being generated)."""
    from worker.prefixcache import PrefixCache

    limit = init.memory_limit_bytes

    def used() -> int:
        m = engine.memory()
        return max(m["rss_bytes"], m["mlx_active_bytes"])

    def room(nbytes: int) -> bool:  # never past the limit, whatever the estimate said
        return limit <= 0 or used() + nbytes < 0.9 * limit

    budget = init.prefix_cache_bytes if limit <= 0 else min(init.prefix_cache_bytes, max(0, (limit - used()) // 2))
    disk = None
    if budget > 0 and init.prefix_cache_dir and init.prefix_cache_disk_bytes > 0 and init.weights_key:
        from worker.prefixdisk import PrefixDisk

        try:
            disk = PrefixDisk(init.prefix_cache_dir, init.prefix_cache_disk_bytes,
                              {"weights": init.weights_key, **engine.versions()}, engine.model)
        except Exception as exc:  # an unwritable state dir (or an odd cache) costs persistence, not serving
            log("worker.prefix_cache_disk_unusable", level="warning", error=repr(exc))
    return PrefixCache(init.revision, budget, disk, room)


def _flush_and_exit(code: int) -> None:
    # Give the IO thread a moment to put the error on the wire before the process ends.
    time.sleep(0.2)
    raise SystemExit(code)
