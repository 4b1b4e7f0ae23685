"""SupervisorClient: asyncio-first RPC client of the supervisor (streaming, cancel, deadlines), plus
a small sync wrapper. Every call has a deadline and a lost supervisor is a typed error, not a hang."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any, Optional

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import codec
from protocol import endpoint as ep
from protocol import errors as E
from protocol import keys
from protocol.adminclient import AdminCalls
from protocol.genstream import GenerateStream, Result
from protocol.loopreader import LoopReader, monitor_socket
from protocol.messages import (
    TO_CLIENT, Ack, Chunk, CountTokens, Error, GenerateRequest, HistoryReply, HistoryRequest,
    LoadRequest, Message, StatusReply, StatusRequest, TokenCount, UnloadRequest,
)

__all__ = ["SupervisorClient", "SyncSupervisorClient", "GenerateStream", "EventStream", "Result", "Chunk"]

log = logging.getLogger("lmx.client")


def _note(level: str, event: str, **fields: Any) -> None:
    """One JSON line on the caller's `lmx.client` logger, shaped like the daemon's (docs/events.md)."""
    log.log(logging.getLevelName(level.upper()), "%s", json.dumps({"event": event, "level": level, **fields}))


class SupervisorClient(AdminCalls):
    """One DEALER socket multiplexing any number of concurrent requests by request id.

    Errors stay with the request they belong to. A request out of the wire's bounds
    (protocol.limits) fails with BAD_REQUEST before it is sent, and the supervisor answers an
    invalid request with that request's id, so one bad request never ends another. Only what
    makes the connection itself unusable fails every request waiting on it: the supervisor went
    away or refused this client's key (SUPERVISOR_UNAVAILABLE / UNAUTHORIZED), or it speaks
    another protocol version (BAD_REQUEST, protocol mismatch). An error the supervisor could not
    pin on a request (request_id None: a frame of ours it could not read at all) or a reply this
    client cannot read concerns none of the pending requests — each of them was sent checked, with
    a readable id — so it is logged (logger `lmx.client`) and dropped; were a pending request the
    cause after all, its own deadline still ends it."""

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
                self._fail_all(E.SupervisorUnavailable("connection to the supervisor was lost",
                                                       endpoint=self.endpoint))

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
            self._fail_all(self._refused)
        return True

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = codec.decode(frames, TO_CLIENT)
        except codec.ProtocolMismatch as exc:
            # Nothing this supervisor sends can be read: every request on the connection is lost.
            self._fail_all(exc)
            return
        except codec.InvalidMessage as exc:
            msg = Error.from_exc(exc.request_id, exc)
        except E.LmxError as exc:
            _note("warning", "client.reply_unreadable", endpoint=self.endpoint, code=exc.code.code,
                  message=exc.message[:500])
            return
        rid = getattr(msg, "request_id", None)
        if rid is None:
            assert isinstance(msg, Error)  # the only reply type whose request_id may be None
            _note("warning", "client.error_unattributed", endpoint=self.endpoint, code=msg.code,
                  message=msg.message[:500])
            return
        q = self._pending.get(rid)
        if q is not None:
            q.put_nowait(msg)

    def _fail_all(self, exc: E.LmxError) -> None:
        """The connection is unusable: fail what waits, and what is asked until it reconnects."""
        self._lost = exc
        for q in self._pending.values():
            q.put_nowait(Error.from_exc(None, exc))

    def _reader_failed(self, failed: asyncio.Future) -> None:
        if failed.cancelled() or failed.exception() is None:
            return
        self._fail_all(E.SupervisorUnavailable(f"reading replies failed: {failed.exception()!r}",
                                               endpoint=self.endpoint))

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
        frames = codec.encode(msg)
        if len(frames[1]) > codec.MAX_FRAME_BYTES:
            # Past MAXMSGSIZE the supervisor's ZeroMQ drops the whole connection, not the message.
            raise E.BadRequest(f"{msg.TAG}: the message has {len(frames[1])} bytes, more than "
                               f"{codec.MAX_FRAME_BYTES}")
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            raise E.Overloaded("this client's send queue is full: the supervisor is not reading it",
                               retry_after_s=1.0) from None
        assert self._reader is not None
        self._reader.after_send()

    async def _begin(self, msg: Message) -> asyncio.Queue:
        codec.check(msg)  # wrong types or out of bounds: this request fails here, before the wire
        await self.connect()
        rid = getattr(msg, "request_id")
        if self._lost is not None:
            raise self._lost
        q: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = q
        try:
            await self._send(msg)
        except BaseException:
            self._end(rid)
            raise
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
        thinking_budget: int | None = None,
        parallel_tool_calls: bool = True,
        **agent: Any,
    ) -> GenerateStream:
        """Stream a generation. The deadline covers the whole request and travels to the supervisor.
        thinking_budget: at most this many thinking tokens, then the model closes its think block;
        parallel_tool_calls=False: at most one tool call (both left off the wire unless set)."""
        t = timeout_s or self.timeout_s
        # agent: tools, tool_choice, tool_name, response_format, logprobs, top_logprobs,
        # chat_template_kwargs, top_k (GenerateRequest); an unknown name is a TypeError here, not on the wire.
        req = GenerateRequest(self._rid(), model, prompt, messages, max_tokens, temperature, top_p,
                              seed, list(stop or []), t, thinking_budget=thinking_budget,
                              parallel_tool_calls=parallel_tool_calls, **agent)
        return GenerateStream(self, req, t)

    async def count_tokens(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                           tools: list[dict] | None = None, tool_choice: str | None = None,
                           chat_template_kwargs: dict | None = None, timeout_s: float | None = None) -> int:
        """How many tokens a generation with these fields would have as its prompt (the model's own
        tokenizer and chat template, tools included), counted by its worker without generating."""
        t = timeout_s or min(self.timeout_s, 30.0)
        req = CountTokens(self._rid(), model, prompt, messages, tools, tool_choice, chat_template_kwargs, t)
        reply = await self._call(req, t)
        assert isinstance(reply, TokenCount)
        return reply.prompt_tokens

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

    def events(self, *prefixes: str) -> EventStream:
        """Follow lifecycle events whose name starts with one of `prefixes` (default: all)."""
        if not self.events_endpoint:
            raise E.BadRequest("no events endpoint: pass events_endpoint= with a tcp:// control endpoint")
        return EventStream(self.events_endpoint, prefixes)


# The event stream and the blocking facade live in modules of their own; this stays the import path.
from protocol.eventstream import EventStream  # noqa: E402
from protocol.syncclient import SyncSupervisorClient  # noqa: E402
