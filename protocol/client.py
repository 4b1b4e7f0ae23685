"""SupervisorClient: asyncio-first RPC client of the supervisor (streaming, cancel, deadlines), plus
a small sync wrapper. Every call has a deadline and a lost supervisor is a typed error, not a hang."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import codec
from protocol import endpoint as ep
from protocol import errors as E
from protocol import keys
from protocol.loopreader import LoopReader, monitor_socket
from protocol.messages import (
    TO_CLIENT, Ack, AdminRequest, Cancel, Chunk, Error, Final, GenerateRequest, HistoryReply, HistoryRequest,
    LoadRequest, Message, StatusReply, StatusRequest, UnloadRequest,
)

__all__ = ["SupervisorClient", "SyncSupervisorClient", "GenerateStream", "EventStream", "Result", "Chunk"]


@dataclass
class Result:
    text: str
    finish_reason: str
    usage: dict
    timings: dict


class GenerateStream:
    """`async for chunk in stream` yields Chunk; afterwards `stream.result` holds the Result.
    Leaving early (break, exception) should go through `async with` or `aclose()` to cancel."""

    def __init__(self, client: "SupervisorClient", req: GenerateRequest, timeout_s: float) -> None:
        self._client = client
        self._req = req
        self._timeout_s = timeout_s
        self._queue: Optional[asyncio.Queue] = None
        self._deadline = 0.0
        self.result: Optional[Result] = None
        self._done = False
        self._held: Optional[Message] = None  # a Final/Error read while coalescing chunks

    @property
    def request_id(self) -> str:
        return self._req.request_id

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout_s
        self._queue = await self._client._begin(self._req)

    def __aiter__(self) -> "GenerateStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            await self._open()
        assert self._queue is not None
        msg = self._held
        self._held = None
        if msg is None and not self._queue.empty():
            msg = self._queue.get_nowait()  # no timer needed for what is already here
        if msg is None:
            remaining = self._deadline - asyncio.get_running_loop().time()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives
                # with a chunk (CPython gh-86296), and a cancelled reader must cancel the request.
                async with asyncio.timeout(max(0.0, remaining)):
                    msg = await self._queue.get()
            except TimeoutError:
                await self.aclose()
                raise E.RequestTimeout(f"no result within {self._timeout_s}s") from None
        if isinstance(msg, Chunk):
            return self._coalesce(msg)
        self._finish()
        if isinstance(msg, Final):
            self.result = Result(msg.text, msg.finish_reason, msg.usage, msg.timings)
            raise StopAsyncIteration
        if isinstance(msg, Error):
            raise msg.to_exc()
        raise E.InternalError(f"unexpected reply {msg.TAG}")

    def _coalesce(self, chunk: Chunk) -> Chunk:
        """A reader slower than the tokens gets one chunk with everything that arrived meanwhile,
        not a backlog of tiny ones."""
        if self._queue is None or self._queue.empty():
            return chunk
        texts, tokens = [chunk.text], chunk.tokens
        while not self._queue.empty():
            nxt = self._queue.get_nowait()
            if not isinstance(nxt, Chunk):
                self._held = nxt  # the end of the stream: returned by the next call
                break
            texts.append(nxt.text)
            tokens += nxt.tokens
        return Chunk(chunk.request_id, "".join(texts), tokens)

    def _finish(self) -> None:
        self._done = True
        self._client._end(self.request_id)

    async def aclose(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        if self._queue is not None and not self._done:
            self._finish()
            await self._client._send(Cancel(self.request_id))

    async def __aenter__(self) -> "GenerateStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def collect(self) -> Result:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


class SupervisorClient:
    """One DEALER socket multiplexing any number of concurrent requests by request id."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        state_dir: str | os.PathLike | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 3.0,
        events_endpoint: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        client_cert: str | os.PathLike | None = None,
        server_key_file: str | os.PathLike | None = None,
    ) -> None:
        """A tcp:// endpoint takes CURVE keys: the server's public key and this client's keypair,
        as z85 text (curve_*) or as files (`server_key_file`: the server's .key, `client_cert`:
        this client's .key_secret, from `lmxctl keys new`)."""
        self.endpoint = endpoint or ep.control_endpoint(state_dir)
        self._curve = keys.client_keys(curve_server_key, curve_public_key, curve_secret_key, client_cert,
                                       server_key_file)
        if events_endpoint is None and self.endpoint.startswith("ipc://"):
            events_endpoint = f"ipc://{os.path.join(os.path.dirname(self.endpoint[6:]), ep.EVENTS_SOCKET)}"
        self.events_endpoint = events_endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ctx: Optional[zmq.asyncio.Context] = None
        # The request socket is a plain one read by the loop's reader callback (protocol.loopreader):
        # a reply reaches its waiter one loop turn after the socket is readable.
        self._sock: Optional[zmq.Socket] = None
        self._reader: Optional[LoopReader] = None
        self._monitor: Optional[zmq.asyncio.Socket] = None
        self._pending: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._connected: Optional[asyncio.Event] = None
        self._lost: Optional[E.LmxError] = None
        self._refused: Optional[E.LmxError] = None

    # --- connection ----------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._sock is not None:
            return
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise E.SupervisorUnavailable(
                f"no supervisor socket at {self.endpoint[6:]} (is lmx-supervisor running with this state dir?)",
                endpoint=self.endpoint)
        self._ctx = zmq.asyncio.Context()
        sock = zmq.Context.shadow(self._ctx.underlying).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        if self._curve is not None:
            server, public, secret = self._curve
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            # Connected means the CURVE handshake passed (the server knows our key), not just tcp.
            events |= zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        monitor = monitor_socket(sock, self._ctx, events)
        self._monitor = monitor
        self._connected = asyncio.Event()
        self._refused = None
        sock.connect(self.endpoint)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._reader = LoopReader(sock, self._dispatch)
        self._reader.failed.add_done_callback(self._reader_failed)
        self._tasks = [loop.create_task(self._watch(monitor))]
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            await self.close()
            raise E.SupervisorUnavailable(
                f"could not connect to {self.endpoint} within {self.connect_timeout_s}s"
                + (" (no CURVE handshake: wrong server key, or not a CURVE endpoint?)" if self._curve else ""),
                endpoint=self.endpoint) from None
        if self._refused is not None:
            await self.close()
            raise self._refused

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if self._curve is not None and self._handshake(event["event"]):
                continue
            if event["event"] == zmq.EVENT_CONNECTED:
                self._lost = None
                assert self._connected is not None
                self._connected.set()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                # ZeroMQ would silently reconnect and our requests would wait forever: every
                # request in flight on the old connection is lost, so say so at once.
                self._lost = E.SupervisorUnavailable("connection to the supervisor was lost",
                                                     endpoint=self.endpoint)
                for q in self._pending.values():
                    q.put_nowait(Error.from_exc(None, self._lost))

    def _handshake(self, event: int) -> bool:
        """CURVE: the handshake's outcome decides `connected`; True when the event is handled."""
        assert self._connected is not None
        if event == zmq.EVENT_CONNECTED:
            return True  # tcp only: wait for the handshake
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._lost = None
            self._connected.set()
            return True
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._refused = E.Unauthorized(f"{self.endpoint} refused this client's CURVE key "
                                           "(not in the supervisor's [[clients]])", endpoint=self.endpoint)
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self._refused = E.SupervisorUnavailable(f"CURVE handshake with {self.endpoint} failed "
                                                    "(wrong server key, or not a CURVE endpoint?)",
                                                    endpoint=self.endpoint)
        else:
            return False
        if not self._connected.is_set():
            self._connected.set()  # wakes connect(), which raises _refused
        else:  # refused on a reconnect (the key was taken off the list): fail what waits
            self._lost = self._refused
            for q in self._pending.values():
                q.put_nowait(Error.from_exc(None, self._refused))
        return True

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = codec.decode(frames, TO_CLIENT)
        except E.LmxError as exc:
            msg = Error.from_exc(None, exc)
        rid = getattr(msg, "request_id", None)
        if rid is None:
            for q in self._pending.values():  # a connection-level error concerns every request
                q.put_nowait(msg)
            return
        q = self._pending.get(rid)
        if q is not None:
            q.put_nowait(msg)

    def _reader_failed(self, failed: asyncio.Future) -> None:
        if failed.cancelled() or failed.exception() is None:
            return
        self._lost = E.SupervisorUnavailable(f"reading replies failed: {failed.exception()!r}",
                                             endpoint=self.endpoint)
        for q in self._pending.values():
            q.put_nowait(Error.from_exc(None, self._lost))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        # The monitor through its asyncio wrapper (it unregisters its fd from the loop); both
        # closed before term(), which waits for every socket of the context.
        for sock in (self._monitor, self._sock):
            if sock is not None:
                sock.close(linger=0)
        self._monitor = self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> "SupervisorClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- plumbing ------------------------------------------------------------------------------

    async def _send(self, msg: Message) -> None:
        await self.connect()
        assert self._sock is not None
        try:
            self._sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise E.Overloaded("this client's send queue is full: the supervisor is not reading it",
                               retry_after_s=1.0) from None
        assert self._reader is not None
        self._reader.after_send()

    async def _begin(self, msg: Message) -> asyncio.Queue:
        await self.connect()
        rid = getattr(msg, "request_id")
        if self._lost is not None:
            raise self._lost
        q: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = q
        await self._send(msg)
        return q

    def _end(self, rid: str) -> None:
        self._pending.pop(rid, None)

    async def _call(self, msg: Message, timeout_s: float | None = None) -> Message:
        q = await self._begin(msg)
        rid = getattr(msg, "request_id")
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                reply = await q.get()
        except TimeoutError:
            raise E.RequestTimeout(f"{msg.TAG}: no reply within {timeout_s or self.timeout_s}s") from None
        finally:
            self._end(rid)
        if isinstance(reply, Error):
            raise reply.to_exc()
        return reply

    @staticmethod
    def _rid() -> str:
        return uuid.uuid4().hex

    # --- API -----------------------------------------------------------------------------------

    async def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        reply = await self._call(StatusRequest(self._rid()), timeout_s)
        assert isinstance(reply, StatusReply)
        return {"supervisor": reply.supervisor, "models": reply.models}

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> GenerateStream:
        """Stream a generation. The deadline covers the whole request and travels to the supervisor."""
        t = timeout_s or self.timeout_s
        req = GenerateRequest(self._rid(), model, prompt, messages, max_tokens, temperature, top_p,
                              seed, list(stop or []), t)
        return GenerateStream(self, req, t)

    async def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Result:
        async with self.generate(model, prompt, **kwargs) as stream:
            return await stream.collect()

    async def load(self, model: str, force: bool = False, timeout_s: float = 10.0) -> dict:
        reply = await self._call(LoadRequest(self._rid(), model, force), timeout_s)
        assert isinstance(reply, Ack)
        return reply.detail

    async def unload(self, model: str, timeout_s: float = 120.0) -> dict:
        reply = await self._call(UnloadRequest(self._rid(), model), timeout_s)
        assert isinstance(reply, Ack)
        return reply.detail


    async def history(self, model: str, limit: int = 50, timeout_s: float = 10.0) -> list[dict]:
        """Crash records of `model`, newest first."""
        reply = await self._call(HistoryRequest(self._rid(), model, limit), timeout_s)
        assert isinstance(reply, HistoryReply)
        return reply.records

    async def _admin(self, op: str, model: str | None, revision: str | None, timeout_s: float,
                     path: str | None = None, target: str | None = None) -> dict:
        reply = await self._call(AdminRequest(self._rid(), op, model, revision, path, target), timeout_s)
        assert isinstance(reply, Ack)
        return reply.detail

    async def release(self, model: str, timeout_s: float = 30.0) -> dict:
        """Lift a quarantine and start the model again on its configured revision."""
        return await self._admin("release", model, None, timeout_s)

    async def rollback(self, model: str, revision: str | None = None, timeout_s: float = 120.0) -> dict:
        """Run `revision` (default: the last-known-good one)."""
        return await self._admin("rollback", model, revision, timeout_s)

    async def verify(self, model: str, timeout_s: float = 60.0) -> dict:
        """The admission checks on a model's snapshot: {path, findings: [{code, file, message}]}."""
        return await self._admin("verify", model, None, timeout_s)

    async def compat(self, timeout_s: float = 10.0) -> dict:
        """The compatibility registry: {backend (this stack), rows: [{model, backend, outcome, evidence, ...}]}."""
        return await self._admin("compat", None, None, timeout_s)

    async def repair(self, model: str, timeout_s: float = 3600.0) -> dict:
        """Fetch a model's missing/corrupt files from its mirror: {fetched, bytes, findings, state}."""
        return await self._admin("repair", model, None, timeout_s)

    async def probe(self, path: str, timeout_s: float = 900.0) -> dict:
        """Admit, load and canary the snapshot at `path` in a throwaway worker; the registry keeps it."""
        return await self._admin("probe", None, None, timeout_s, path=path)

    async def reload(self, timeout_s: float = 120.0) -> dict:
        """Re-read the config file (like SIGHUP): {added, removed, changed}."""
        return await self._admin("reload", None, None, timeout_s)

    async def swap(self, old: str, new: str, timeout_s: float = 900.0) -> dict:
        """NEW takes over OLD's requests: NEW READY first when memory allows, else OLD drained
        first. Requests for OLD go to NEW from then on: {mode, old, new, state}."""
        return await self._admin("swap", old, None, timeout_s, target=new)

    async def metrics(self, timeout_s: float = 10.0) -> str:
        """The Prometheus text exposition, as the metrics port would serve it."""
        return (await self._admin("metrics", None, None, timeout_s))["text"]

    def events(self, *prefixes: str) -> EventStream:
        """Follow lifecycle events whose name starts with one of `prefixes` (default: all)."""
        if not self.events_endpoint:
            raise E.BadRequest("no events endpoint: pass events_endpoint= with a tcp:// control endpoint")
        return EventStream(self.events_endpoint, prefixes)


# The event stream and the blocking facade live in modules of their own; this stays the import path.
from protocol.eventstream import EventStream  # noqa: E402
from protocol.syncclient import SyncSupervisorClient  # noqa: E402
