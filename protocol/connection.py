"""Connection: one DEALER socket to a supervisor's control endpoint (ipc or CURVE tcp), multiplexing
any number of request streams by request id: `call` (one reply), `stream` (a ReplyStream of replies)
and `send` (no reply). The client library and the peer link's owner side are built on it."""

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
from protocol import errors as E
from protocol.loopreader import LoopReader, monitor_socket
from protocol.messages import TO_CLIENT, Error, Message

log = logging.getLogger("lmx.client")

Curve = tuple[bytes, bytes, bytes]  # the server's public key, this client's public and secret keys


def new_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def note(level: str, event: str, **fields: Any) -> None:
    """One JSON line on the caller's `lmx.client` logger, shaped like the daemon's (docs/events.md)."""
    log.log(logging.getLevelName(level.upper()), "%s", json.dumps({"event": event, "level": level, **fields}))


class ReplyStream:
    """The replies to one request id, in order, until `close()` (or leaving `async with`): each a
    Message, an Error included (an Error with request_id None: the connection was lost)."""

    def __init__(self, conn: "Connection", request_id: str) -> None:
        self.request_id = request_id
        self._conn = conn
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    async def get(self) -> Message:
        """The next reply; bound it with asyncio.timeout (every caller has its own deadline)."""
        return await self._queue.get()

    def get_nowait(self) -> Optional[Message]:
        """The next reply if one is already here, else None."""
        return None if self._queue.empty() else self._queue.get_nowait()

    def empty(self) -> bool:
        return self._queue.empty()

    def deliver(self, msg: Message) -> None:
        self._queue.put_nowait(msg)

    def close(self) -> None:
        """Stop taking replies for this id (idempotent): later ones are dropped."""
        self._conn.forget(self)

    async def __aenter__(self) -> "ReplyStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


class Connection:
    """Errors stay with the request they belong to. A message out of the wire's bounds
    (protocol.limits) fails with BAD_REQUEST in `stream`/`call`, before it is sent, and the
    supervisor answers an invalid request with that request's id, so one bad request never ends
    another. Only what makes the connection itself unusable fails every stream open on it: the
    supervisor went away or refused this client's key (SUPERVISOR_UNAVAILABLE / UNAUTHORIZED), or it
    speaks another protocol version (BAD_REQUEST, protocol mismatch). An error the supervisor could
    not pin on a request (request_id None: a frame of ours it could not read at all) or a reply this
    side cannot read concerns none of the open streams — each was sent checked, with a readable id —
    so it is logged (logger `lmx.client`) and dropped; were an open request the cause after all, its
    own deadline still ends it. ZeroMQ reconnects by itself; a request in flight across a lost
    connection fails at once rather than waiting forever."""

    def __init__(self, endpoint: str, *, curve: Curve | None = None, connect_timeout_s: float = 3.0) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self._curve = curve
        self._ctx: Optional[zmq.asyncio.Context] = None
        # The socket is a plain one read by the loop's reader callback (protocol.loopreader): a
        # reply reaches its stream one loop turn after the socket is readable.
        self._sock: Optional[zmq.Socket] = None
        self._reader: Optional[LoopReader] = None
        self._monitor: Optional[zmq.asyncio.Socket] = None
        self._streams: dict[str, ReplyStream] = {}
        self._tasks: list[asyncio.Task] = []
        self._connected: Optional[asyncio.Event] = None
        self._lost: Optional[E.LmxError] = None
        self._refused: Optional[E.LmxError] = None

    # --- the socket ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect once (later calls return at once); SupervisorUnavailable or Unauthorized when
        the endpoint is not there, does not answer within connect_timeout_s, or refuses the key."""
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
        self._reader = LoopReader(sock, self._dispatch)
        self._reader.failed.add_done_callback(self._reader_failed)
        self._tasks = [asyncio.get_running_loop().create_task(self._watch(monitor))]
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
            note("warning", "client.reply_unreadable", endpoint=self.endpoint, code=exc.code.code,
                 message=exc.message[:500])
            return
        rid = getattr(msg, "request_id", None)
        if rid is None:
            assert isinstance(msg, Error)  # the only reply type whose request_id may be None
            note("warning", "client.error_unattributed", endpoint=self.endpoint, code=msg.code,
                 message=msg.message[:500])
            return
        stream = self._streams.get(rid)
        if stream is not None:
            stream.deliver(msg)

    def _fail_all(self, exc: E.LmxError) -> None:
        """The connection is unusable: fail what waits, and what is asked until it reconnects."""
        self._lost = exc
        for stream in self._streams.values():
            stream.deliver(Error.from_exc(None, exc))

    def _reader_failed(self, failed: asyncio.Future) -> None:
        if failed.cancelled() or failed.exception() is None:
            return
        self._fail_all(E.SupervisorUnavailable(f"reading replies failed: {failed.exception()!r}",
                                               endpoint=self.endpoint))

    async def close(self) -> None:
        """Close the socket (idempotent); a later request connects again."""
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

    # --- requests ------------------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Put `msg` on the wire as it is, expecting no reply (a cancel, a rank's request); only
        its size is checked. `stream` and `call` check the whole message first."""
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

    async def replies(self, request_id: str) -> ReplyStream:
        """A stream for the replies to `request_id`, open before anything is sent with that id;
        the connection's loss (SupervisorUnavailable) is raised here while it lasts."""
        await self.connect()
        if self._lost is not None:
            raise self._lost
        stream = self._streams[request_id] = ReplyStream(self, request_id)
        return stream

    def forget(self, stream: ReplyStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    async def stream(self, msg: Message) -> ReplyStream:
        """Check `msg` (wrong types or out of bounds: BadRequest here, before the wire), send it,
        and return the stream of its replies. Close the stream when done with it."""
        codec.check(msg)
        stream = await self.replies(getattr(msg, "request_id"))
        try:
            await self.send(msg)
        except BaseException:
            stream.close()
            raise
        return stream

    async def call(self, msg: Message, timeout_s: float) -> Message:
        """One request and its one reply within `timeout_s` (else RequestTimeout); an Error reply
        is raised as its typed error."""
        async with await self.stream(msg) as stream:
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await stream.get()
            except TimeoutError:
                raise E.RequestTimeout(f"{msg.TAG}: no reply within {timeout_s}s") from None
        if isinstance(reply, Error):
            raise reply.to_exc()
        return reply
