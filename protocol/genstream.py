"""One generation as the client library sees it: a stream of chunks, then its Result, read from the
ReplyStream of its GenerateRequest on a protocol.connection.Connection. Import it from
protocol.client, with the rest of the client library."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Optional

from protocol import errors as E
from protocol.connection import Connection, ReplyStream
from protocol.messages import Cancel, Chunk, Error, Final, GenerateRequest, Message


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop", "length", or "tool_calls"
    usage: dict  # prompt_tokens, completion_tokens, cached_tokens
    timings: dict
    reasoning: str = ""  # thinking text, apart from `text` (models with think markers)
    tool_calls: list = field(default_factory=list)  # OpenAI shape: id, type, function {name, arguments}
    logprobs: Optional[list] = None  # per token, when the request asked for them
    stop_sequence: Optional[str] = None  # the stop string that ended it, if one did


# The deadline is the supervisor's to enforce: it ends the request as REQUEST_TIMEOUT. Our own timer
# is the backstop for a supervisor that cannot answer, this much later; at the same instant it would
# win (it starts before the request is sent), cancel, and the supervisor would log CANCELLED.
DEADLINE_GRACE_S = 1.0


class GenerateStream:
    """`async for chunk in stream` yields Chunk; afterwards `stream.result` holds the Result.
    Leaving early (break, exception) should go through `async with` or `aclose()` to cancel."""

    def __init__(self, connection: Connection, req: GenerateRequest, timeout_s: float) -> None:
        self._connection = connection
        self._req = req
        self._timeout_s = timeout_s
        self._replies: Optional[ReplyStream] = None
        self._deadline = 0.0
        self.result: Optional[Result] = None
        self._done = False
        self._held: Optional[Message] = None  # a Final/Error read while coalescing chunks

    @property
    def request_id(self) -> str:
        return self._req.request_id

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout_s + DEADLINE_GRACE_S
        self._replies = await self._connection.stream(self._req)

    def __aiter__(self) -> "GenerateStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        if self._replies is None:
            await self._open()
        assert self._replies is not None
        msg = self._held
        self._held = None
        if msg is None:
            msg = self._replies.get_nowait()  # no timer needed for what is already here
        if msg is None:
            remaining = self._deadline - asyncio.get_running_loop().time()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives
                # with a chunk (CPython gh-86296), and a cancelled reader must cancel the request.
                async with asyncio.timeout(max(0.0, remaining)):
                    msg = await self._replies.get()
            except TimeoutError:
                await self.aclose()
                raise E.RequestTimeout(f"no result within {self._timeout_s}s") from None
        if isinstance(msg, Chunk):
            return self._coalesce(msg)
        self._finish()
        if isinstance(msg, Final):
            self.result = Result(msg.text, msg.finish_reason, msg.usage, msg.timings, msg.reasoning,
                                 msg.tool_calls, msg.logprobs, msg.stop_sequence)
            raise StopAsyncIteration
        if isinstance(msg, Error):
            raise msg.to_exc()
        raise E.InternalError(f"unexpected reply {msg.TAG}")

    def _coalesce(self, chunk: Chunk) -> Chunk:
        """A reader slower than the tokens gets one chunk with everything that arrived meanwhile,
        not a backlog of tiny ones."""
        if self._replies is None or self._replies.empty():
            return chunk
        merged = Chunk(chunk.request_id, chunk.text, chunk.tokens, chunk.reasoning, list(chunk.tool_calls),
                       None if chunk.logprobs is None else list(chunk.logprobs))
        while (nxt := self._replies.get_nowait()) is not None:
            if not isinstance(nxt, Chunk):
                self._held = nxt  # the end of the stream: returned by the next call
                break
            merged.text += nxt.text
            merged.tokens += nxt.tokens
            merged.reasoning += nxt.reasoning
            merged.tool_calls += nxt.tool_calls
            if nxt.logprobs is not None:
                merged.logprobs = (merged.logprobs or []) + nxt.logprobs
        return merged

    def _finish(self) -> None:
        self._done = True
        assert self._replies is not None
        self._replies.close()

    async def aclose(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        if self._replies is not None and not self._done:
            self._finish()
            await self._connection.send(Cancel(self.request_id))

    async def __aenter__(self) -> "GenerateStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def collect(self) -> Result:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result
