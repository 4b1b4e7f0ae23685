"""A control endpoint: a ROUTER socket (the ipc one in the state dir, or the tcp one for CURVE
clients) that decodes each client message and dispatches it by its type, through one table, onto
Operations (status, load, unload, history, the admin ops), the Router (generate, count tokens,
cancel) or the peer link (a group's ranks placed here), and answers it with a typed reply."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import admin as A
from protocol import peer as P
from protocol import codec
from protocol import errors as E
from protocol.loopreader import LoopReader, monitor_socket
from protocol.messages import (
    TO_SUPERVISOR_FROM_CLIENT, Ack, AdminRequest, Cancel, Chunk, CountTokens, EmbedRequest, Embeddings, Error, Final,
    GenerateRequest,
    HistoryReply, HistoryRequest, LoadRequest, Message, RerankRequest, RerankScores, StatusReply, StatusRequest,
    TokenCount, UnloadRequest,
)
from supervisor import config as cfg_mod, logs
from supervisor.control.auth import Access
from supervisor.control.metrics import RequestTimer
from supervisor.logs import LogLimit
from supervisor.control.router import Key, Router
from supervisor.operations.verbs import Operations
from supervisor.services import Services

def _misfit(req: EmbedRequest | RerankRequest, msg: Embeddings | RerankScores) -> str | None:
    """Why a worker's reply does not fit its request, or None."""
    if isinstance(req, EmbedRequest) and isinstance(msg, Embeddings):
        if len(msg.data) == 4 * msg.dims * len(req.inputs) and req.dimensions in (None, msg.dims):
            return None
        return (f"the worker sent {len(msg.data) // (4 * msg.dims)} vectors of {msg.dims} for "
                f"{len(req.inputs)} inputs (dimensions {req.dimensions})")
    if isinstance(req, RerankRequest) and isinstance(msg, RerankScores):
        if len(msg.scores) == len(req.documents):
            return None
        return f"the worker sent {len(msg.scores)} scores for {len(req.documents)} documents"
    return f"the worker answered a {req.TAG} request with {msg.TAG}"


Handler = Callable[[bytes, Any], None]  # (the client's identity, its message): answers it, now or later
AdminHandler = Callable[[Any], Awaitable[A.AdminReply | dict[str, Any]]]


class ControlServer:
    """Decodes client frames, answers each with a typed reply; never lets one client block another."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, socket_path: Path | None, ops: Operations,
                 router: Router, services: Services, configure: Callable[[zmq.Socket], None] | None = None,
                 access: Access | None = None) -> None:
        # A plain socket read by the loop's reader callback (protocol.loopreader); the connection
        # monitor is read by a task, so it lives on the asyncio context.
        self._sock = zmq.Context.shadow(ctx.underlying).socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        # Per client: a slow reader is cancelled past it (see send).
        self._sock.setsockopt(zmq.SNDHWM, services.config.supervisor.client_buffer_messages)
        # A send to a client that is gone, or whose buffer is full, fails instead of vanishing.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if configure is not None:  # the tcp endpoint: CURVE server options, before bind
            configure(self._sock)
        self._sock.bind(endpoint)
        if socket_path is not None:
            os.chmod(socket_path, 0o600)
        # None: the ipc socket, where only the owner can connect (the owner is admin); else the
        # roles of the tcp endpoint's CURVE clients.
        self._access = access
        self._name = endpoint  # a client is (endpoint, identity): identities are unique per socket only
        self._ops = ops
        self._router = router
        self._placed = services.placed  # ranks for peers' groups (None: this supervisor places none)
        self._metrics = services.metrics
        self.connections = 0  # open client connections, from the socket's monitor
        self._monitor = monitor_socket(self._sock, ctx, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._task: asyncio.Task | None = None
        self._reader: LoopReader | None = None
        self._bg: set[asyncio.Task] = set()
        self._admin_ops = self._admin_table()
        self._handlers = self._table()
        self.log = logs.get()
        self._log_limit = LogLimit(self.log)  # what a peer can make us log, it cannot make us log forever

    @property
    def task(self) -> asyncio.Task | None:
        """The reading task: it ends only when reading failed (the daemon exits on that)."""
        return self._task

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # With an allow-list the frames are kept as zmq Frames: the ZAP handler's User-Id rides on them.
        self._reader = LoopReader(self._sock, self._on_frames, copy=self._access is None)
        self._task = loop.create_task(self._watch(), name="control")
        self._background(self._count_connections())

    async def _watch(self) -> None:
        assert self._reader is not None
        await self._reader.failed  # reading failed: the daemon exits rather than stay deaf

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._reader is not None:
            self._reader.close()
        for task in self._bg:
            task.cancel()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    async def _count_connections(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            self.connections = max(0, self.connections + (1 if event == zmq.EVENT_ACCEPTED else -1))

    def send(self, identity: bytes, msg: Message) -> str | None:
        """Queue a message for a client. None when queued, else why not: "gone" (the client has
        disconnected), "full" (its buffer of SNDHWM messages is full: it stopped reading) or
        "failed" (anything else ZeroMQ refused; logged)."""
        try:
            self._sock.send_multipart([identity, *codec.encode(msg)], zmq.NOBLOCK)
            return None
        except zmq.Again:
            return "full"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "gone"
            self._log_limit.log("warning", "client.send_failed", type=msg.TAG, error=str(exc))
            return "failed"
        finally:
            if self._reader is not None:
                self._reader.after_send()

    def _on_frames(self, raw: list) -> None:
        user = None
        if self._access is None:
            frames = raw
        else:  # the ZAP handler's User-Id (the public key the client proved) rides on every frame it sent
            user = raw[-1].get("User-Id") if len(raw) > 1 else None
            frames = [f.bytes for f in raw]
        identity, rest = frames[0], frames[1:]
        try:
            msg = codec.decode(rest, TO_SUPERVISOR_FROM_CLIENT)
        except E.LmxError as exc:
            # An invalid request whose id could be read is that request's failure; only a frame
            # with no readable id is answered for the connection (request_id None).
            rid = exc.request_id if isinstance(exc, codec.InvalidMessage) else None
            self._log_limit.log("warning", "client.bad_request", code=exc.code.code, message=exc.message[:500],
                                request_id=rid)
            self._refuse(identity, rid, exc)
            return
        try:
            if self._access is not None:
                self._access.check(user, msg)
            self._handle(identity, msg)
        except E.LmxError as exc:
            if isinstance(msg, GenerateRequest):
                self._metrics.requests.labels(msg.model if msg.model in self._ops.models else "",
                                              exc.code.code).inc()
            self._refuse(identity, getattr(msg, "request_id", None), exc)
        except Exception as exc:
            self.log.exception("internal.control_failed", type=msg.TAG)
            self._refuse(identity, getattr(msg, "request_id", None), E.InternalError(f"internal error: {exc!r}"))

    def _refuse(self, identity: bytes, rid: str | None, exc: E.LmxError) -> None:
        """Answer `exc` for request `rid`. When that id is in flight (a reused id, a broken cancel)
        the client takes the error as that request's end, so its generation is cancelled too:
        nothing generates for nobody."""
        if rid is not None:
            self._router.cancel(((self._name, identity), rid))
        self.send(identity, Error.from_exc(rid, exc))

    def _table(self) -> dict[type[Message], Handler]:
        """Dispatch: each message type the client direction carries -> its handler. Load and unload
        (older than the admin ops) are answered by an Ack when done; the admin ops through
        `_admin`, a legacy `AdminRequest` by the typed op it stands for."""
        ops = self._ops
        table: dict[type[Message], Handler] = {
            StatusRequest: self._status,
            GenerateRequest: self._generate, CountTokens: self._generate, EmbedRequest: self._generate,
            RerankRequest: self._generate,
            Cancel: lambda identity, msg: self._router.cancel(((self._name, identity), msg.request_id)),
            LoadRequest: lambda identity, msg: self._later(identity, msg.request_id, ops.load(msg.model, msg.force)),
            UnloadRequest: lambda identity, msg: self._later(identity, msg.request_id, ops.unload(msg.model)),
            HistoryRequest: lambda identity, msg: self.send(identity, HistoryReply(
                msg.request_id, msg.model, ops.history(msg.model, msg.limit))),
            P.RankPlace: self._peer, P.RankSend: self._peer, P.RankEnd: self._peer,
            AdminRequest: lambda identity, msg: self._background(self._admin(identity, msg.typed(), legacy=True)),
        }
        for op in self._admin_ops:
            table[op] = lambda identity, msg: self._background(self._admin(identity, msg, legacy=False))
        return table

    def _handle(self, identity: bytes, msg: Message) -> None:
        self._handlers[type(msg)](identity, msg)

    def _status(self, identity: bytes, msg: StatusRequest) -> None:
        sup, models = self._ops.status()
        # Each model's entry is a ModelStatus: the keys on the wire are exactly its fields.
        self.send(identity, StatusReply(msg.request_id, sup, [m.to_dict() for m in models]))

    def _later(self, identity: bytes, request_id: str, op: Awaitable[dict[str, Any]]) -> None:
        self._background(self._answer(identity, request_id, op))

    def _peer(self, identity: bytes, msg: Message) -> None:
        """The peer link: a group's owner places, feeds and ends ranks here (supervisor.workers.placed)."""
        placed = self._placed
        if placed is None:
            raise E.BadRequest("this supervisor places no ranks for peers")
        if isinstance(msg, P.RankSend):
            placed.send(msg)
        elif isinstance(msg, P.RankEnd):
            placed.end(msg)
            self.send(identity, Ack(msg.request_id, {"group": msg.group}))
        else:
            async def place() -> None:
                try:
                    await placed.place(msg, lambda report: self.send(identity, report))
                except E.LmxError as exc:
                    self.log.warning("peer.rank_refused", group=msg.group, rank=msg.rank, code=exc.code.code,
                                     message=exc.message)
                    self.send(identity, Error.from_exc(msg.request_id, exc))

            self._background(place())

    def _admin_table(self) -> dict[type[A.AdminOp], AdminHandler]:
        """Each admin op's type -> its call on Operations. A handler returns a typed reply where the
        answer has a fixed shape, else the detail dict an Ack carries."""
        ops = self._ops
        return {
            A.ReloadRequest: lambda req: ops.reload(), A.SwapRequest: lambda req: ops.swap(req.model, req.target),
            A.MetricsRequest: self._metrics_op, A.CacheClearRequest: self._cache_clear_op,
            A.CompatRequest: self._compat_op, A.ProbeRequest: lambda req: ops.probe(req.path),
            A.RepairRequest: lambda req: ops.repair(req.model), A.VerifyRequest: self._verify_op,
            A.ReleaseRequest: lambda req: ops.release(req.model),
            A.RollbackRequest: lambda req: ops.rollback(req.model, req.revision),
        }

    async def _admin(self, identity: bytes, msg: A.AdminOp, legacy: bool) -> None:
        """Run one admin operation and answer it: a legacy `AdminRequest` (an older client, which
        reads only Ack) gets the reply's detail in an Ack, a typed request its typed reply."""
        try:
            reply = await self._admin_ops[type(msg)](msg)
            detail = reply.detail() if isinstance(reply, A.AdminReply) else reply
            if not isinstance(msg, A.MetricsRequest):  # the exposition is no event
                self.log.info("admin.done", op=msg.OP, model=msg.subject(), **detail)
            if legacy or not isinstance(reply, A.AdminReply):
                reply = Ack(msg.request_id, detail)
            self.send(identity, reply)
        except cfg_mod.ConfigError as exc:
            self.send(identity, Error.from_exc(msg.request_id, E.ConfigInvalid(str(exc), key=exc.key)))
        except E.LmxError as exc:
            self.send(identity, Error.from_exc(msg.request_id, exc))
        except Exception as exc:  # a bug: the client still gets an answer, never a silent wait
            self.log.exception("internal.control_failed", type=msg.TAG, op=msg.OP)
            self.send(identity, Error.from_exc(msg.request_id, E.InternalError(f"internal error: {exc!r}")))

    async def _metrics_op(self, req: A.MetricsRequest) -> A.MetricsReply:
        return A.MetricsReply(req.request_id, self._metrics.render().decode())

    async def _cache_clear_op(self, req: A.CacheClearRequest) -> A.CacheClearReply:
        return A.CacheClearReply(req.request_id, *self._ops.clear_prefix_cache(req.model))

    async def _compat_op(self, req: A.CompatRequest) -> A.CompatReply:
        return A.CompatReply(req.request_id, *self._ops.compat())

    async def _verify_op(self, req: A.VerifyRequest) -> A.VerifyReply:
        path, findings = self._ops.verify(req.model)
        return A.VerifyReply(req.request_id, path, [f.to_dict() for f in findings])

    def _generate(self, identity: bytes, req: GenerateRequest | CountTokens | EmbedRequest | RerankRequest) -> None:
        """A generation, a token count, an embedding or a rerank: routed alike (same states, limits,
        deadline, cancel); the router refuses one its model's kind does not serve."""
        runtime, req = self._router.admit((self._name, identity), req)
        key = ((self._name, identity), req.request_id)
        if isinstance(req, CountTokens):
            worker = runtime.worker
            if worker is not None and worker.loaded is not None and not worker.knows(req.TAG):
                raise E.BadRequest(f"model {runtime.cfg.id}'s worker predates count_tokens (adopted from "
                                   "an older version): unload and load it to count", reason="worker_outdated")
            sink = self._count_sink(identity, key, req)
        elif isinstance(req, (EmbedRequest, RerankRequest)):
            sink = self._encoder_sink(identity, key, req)
        else:
            sink = self._sink(identity, key, req)
        self._router.add(key, runtime, runtime.submit(req, sink))

    def _count_sink(self, identity: bytes, key: Key, req: CountTokens) -> Callable[[Message], None]:
        client_rid, router = req.request_id, self._router

        def sink(msg: Message) -> None:
            if isinstance(msg, (TokenCount, Error)) and router.end(key):
                self.send(identity, dataclasses.replace(msg, request_id=client_rid))

        return sink

    def _encoder_sink(self, identity: bytes, key: Key, req: EmbedRequest | RerankRequest) -> Callable[[Message], None]:
        """An embedding's or a rerank's one reply goes out only in the shape asked (as many vectors
        as inputs and as wide, a score per document): another shape is the worker's bug, answered
        as INTERNAL, never handed on as someone's result."""
        client_rid, router, metrics = req.request_id, self._router, self._metrics
        log = self.log.bind(model=req.model, request_id=client_rid)
        inputs = len(req.inputs) if isinstance(req, EmbedRequest) else len(req.documents)

        def sink(msg: Message) -> None:
            if not isinstance(msg, (Embeddings, RerankScores, Error)) or not router.end(key):
                return
            problem = None if isinstance(msg, Error) else _misfit(req, msg)
            if problem is not None:
                msg = Error.from_exc(msg.request_id, E.InternalError(problem))
            code = "ok" if not isinstance(msg, Error) else msg.code
            self.send(identity, dataclasses.replace(msg, request_id=client_rid))
            metrics.requests.labels(req.model, code).inc()
            if not isinstance(msg, Error):
                log.info("request.done", inputs=inputs, prompt_tokens=msg.prompt_tokens)
            else:
                log.info("request.failed", code=code, message=msg.message, inputs=inputs)

        return sink

    def _sink(self, identity: bytes, key: Key, req: GenerateRequest) -> Callable[[Message], None]:
        """Where a request's results go: to its client, under the client's own id, counted and logged."""
        client_rid, router = req.request_id, self._router
        log = self.log.bind(model=req.model, request_id=client_rid)
        metrics, timer = self._metrics, RequestTimer(self._metrics, req.model)

        def sink(msg: Message) -> None:
            if isinstance(msg, Chunk):
                timer.chunk(msg.tokens)
                unsent = self.send(identity, dataclasses.replace(msg, request_id=client_rid))
                # Its client is gone, or its buffer is full because it stopped reading: cancel
                # rather than generate for nobody, or send a stream with a hole in it; the slot
                # goes back to clients that read.
                if unsent and router.cancel(key):
                    if unsent == "full":
                        log.warning("client.slow_reader_cancelled", code="CANCELLED")
                    else:
                        log.info("client.gone_cancelled", code="CANCELLED", reason=unsent)
                return
            router.end(key)
            duration_s = round(time.monotonic() - timer.start, 4)
            if isinstance(msg, Final):
                self.send(identity, dataclasses.replace(msg, request_id=client_rid))
                metrics.requests.labels(req.model, "ok").inc()
                timer.final(msg.usage.get("completion_tokens", 0))
                log.info("request.done", finish_reason=msg.finish_reason, duration_s=duration_s, **msg.usage)
            elif isinstance(msg, Error):
                self.send(identity, Error(client_rid, msg.code, msg.message, msg.details))
                metrics.requests.labels(req.model, msg.code).inc()
                log.info("request.failed", code=msg.code, message=msg.message, duration_s=duration_s)

        return sink

    async def _answer(self, identity: bytes, request_id: str, op: Awaitable[dict[str, Any]]) -> None:
        """A per-model operation, answered when it is done (it may wait for another on its model)."""
        try:
            self.send(identity, Ack(request_id, await op))
        except E.LmxError as exc:
            self.send(identity, Error.from_exc(request_id, exc))
        except Exception as exc:  # a bug: the client still gets an answer, never a silent wait
            self.log.exception("internal.control_failed", type="admin")
            self.send(identity, Error.from_exc(request_id, E.InternalError(f"internal error: {exc!r}")))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
