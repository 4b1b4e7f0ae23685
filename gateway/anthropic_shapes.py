"""Anthropic Messages API responses: the message object, the streamed event sequence (message_start,
content_block_start / _delta / _stop, message_delta, message_stop), and errors in Anthropic's shape
with the LMX code's HTTP status. The framing differs from OpenAI's (named events, no `[DONE]`), so
AnthropicDialect is its dialect (gateway/dialect.py)."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator

from starlette.responses import JSONResponse

from gateway import anthropic
from gateway import errors as http_errors
from gateway.params import GenParams
from gateway.signing import ThinkingSigner
from gateway.sse import dumps
from protocol import errors as E
from protocol.client import GenerateStream, Result
from protocol.messages import Chunk

# finish_reason -> stop_reason ("stop" with a stop_sequence on the wire: one of stop_sequences).
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(result: Result) -> str:
    if result.finish_reason == "stop" and result.stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(result.finish_reason, "end_turn")

# Anthropic's error types by HTTP status; the LMX code keeps the status the OpenAI side gives it.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                529: "overloaded_error"}


def error_type(err: E.LmxError) -> str:
    status = err.http_status
    if status == 503 and err.retryable:
        # Not ready yet, shutting down, supervisor away: Anthropic's clients retry an overload.
        return "overloaded_error"
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(err: E.LmxError, request_id: str | None = None) -> dict[str, Any]:
    """{"type": "error", "error": {type, message, details}}. The LMX code is details.error_code,
    where the anthropic SDK reads a stable cause (`APIStatusError.error_code`); the code's own
    details (param, signal, retry_after_s...) and `retryable` sit beside it."""
    details = {"error_code": err.code.code, "retryable": err.retryable, **err.details}
    message = err.message
    if (over := http_errors.context_exceeded(err)) is not None:
        # Claude Code's compaction and retry logic matches these words.
        message = f"prompt is too long: {over[0]} tokens > {over[1]} maximum"
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(err), "message": message,
                                                       "details": details}}
    if request_id:
        body["request_id"] = request_id
    return body


class AnthropicDialect:
    """Named SSE events (`event: TYPE`), no end marker (message_stop is the end), errors as an
    `error` event; the anthropic SDK reads `request-id`. `signer` signs the thinking blocks it
    returns and verifies those a client sends back."""

    done: bytes | None = None

    def __init__(self, signer: ThinkingSigner | None = None) -> None:
        self.signer = signer

    def parse(self, body: Any) -> GenParams:
        return anthropic.parse(body, self.signer)

    def shaper(self, p: GenParams, request_id: str, applied_edits: list[dict] | None) -> "MessageShaper":
        return MessageShaper(p.model, request_id, self.signer, applied_edits)

    def id_headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id, "request-id": request_id}

    def frame(self, obj: dict) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + dumps(obj) + b"\n\n"

    def error_event(self, err: E.LmxError) -> bytes:
        return self.frame(error_body(err))

    def error_response(self, err: E.LmxError, headers: dict[str, str]) -> JSONResponse:
        return JSONResponse(error_body(err, headers.get("request-id")), status_code=err.http_status,
                            headers={**http_errors.headers(err), **headers})



def usage(u: dict) -> dict[str, int]:
    # Anthropic counts cached prompt tokens apart: input_tokens are the ones prefilled.
    cached = int(u.get("cached_tokens", 0))
    return {"input_tokens": int(u.get("prompt_tokens", 0)) - cached, "output_tokens": int(u.get("completion_tokens", 0)),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _tool_id(call: dict) -> str:
    raw = str(call.get("id") or "")
    return "toolu_" + raw.removeprefix("call_")


def _input(call: dict) -> Any:
    args = (call.get("function") or {}).get("arguments") or "{}"
    try:
        return json.loads(args)
    except ValueError:  # every parser mlx-lm has writes JSON; kept visible if one ever does not
        return {"_unparsed_arguments": args}


def tool_use(call: dict) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_id(call), "name": (call.get("function") or {}).get("name", ""),
            "input": _input(call)}


class MessageShaper:
    """Every object of one /v1/messages response. `signer` signs its thinking blocks (the client
    sends them back next turn); `applied_edits` is what context_management cleared, reported when
    the request asked for context management (None: it did not)."""

    def __init__(self, model: str, request_id: str, signer: ThinkingSigner | None = None,
                 applied_edits: list[dict] | None = None) -> None:
        self.model = model
        self.id = "msg_" + request_id  # the supervisor's request id, as on the OpenAI side
        self._signer = signer
        self._context = None if applied_edits is None else {"applied_edits": applied_edits}

    def _message(self, content: list[dict], reason: str | None, u: dict, stop: str | None = None) -> dict[str, Any]:
        msg = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
               "stop_reason": reason, "stop_sequence": stop, "usage": u}
        if self._context is not None:
            msg["context_management"] = self._context
        return msg

    def _sign(self, thinking: str) -> str:
        return self._signer.sign(thinking) if self._signer is not None else ""

    def full(self, result: Result) -> dict[str, Any]:
        content: list[dict] = []
        if result.reasoning:
            content.append({"type": "thinking", "thinking": result.reasoning, "signature": self._sign(result.reasoning)})
        if result.text or not (content or result.tool_calls):  # as the stream: never no block at all
            content.append({"type": "text", "text": result.text})
        content.extend(tool_use(c) for c in result.tool_calls)
        return self._message(content, stop_reason(result), usage(result.usage), result.stop_sequence)

    async def whole(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        async with stream:
            result = await stream.collect()
        yield self.full(result)

    async def events(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        """The streamed sequence. message_start waits for the first chunk, so a request refused
        before any token exists is an HTTP error with its status, as on the OpenAI side."""
        blocks = _Blocks(self._sign)
        async with stream:  # leaving early any way cancels the generation
            started = False
            async for chunk in stream:
                if not started:
                    started = True
                    yield self._start()
                for obj in blocks.feed(chunk):
                    yield obj
            result = stream.result
            assert result is not None
        if not started:
            yield self._start()
        for obj in blocks.close():
            yield obj
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence},
                 "usage": usage(result.usage)}
        if self._context is not None:
            delta["context_management"] = self._context
        yield delta
        yield {"type": "message_stop"}

    def _start(self) -> dict[str, Any]:
        # The prompt's size is known only at the end (the worker counts it); message_delta's
        # usage carries every figure, and the SDKs take input_tokens from it.
        zero = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        return {"type": "message_start", "message": self._message([], None, zero)}


class _Blocks:
    """Content blocks of a stream: one open at a time; a change of kind closes it and opens the next."""

    def __init__(self, sign: Any) -> None:
        self._index = -1
        self._open: str | None = None
        self._any = False
        self._sign = sign  # thinking text -> its signature, sent as the block's last delta
        self._thinking: list[str] = []

    def _begin(self, kind: str, block: dict) -> list[dict]:
        out = self._end()
        self._index += 1
        self._open, self._any = kind, True
        out.append({"type": "content_block_start", "index": self._index, "content_block": block})
        return out

    def _end(self) -> list[dict]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": self._sign("".join(self._thinking))}))
            self._thinking = []
        self._open = None
        return out + [{"type": "content_block_stop", "index": self._index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def feed(self, chunk: Chunk) -> list[dict]:
        out: list[dict] = []
        if chunk.reasoning:
            if self._open != "thinking":
                out += self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": chunk.reasoning}))
            self._thinking.append(chunk.reasoning)
        if chunk.text:
            if self._open != "text":
                out += self._begin("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": chunk.text}))
        for call in chunk.tool_calls:
            # A call arrives whole (the worker parsed it): one block, its arguments in one delta.
            block = {"type": "tool_use", "id": _tool_id(call), "name": (call.get("function") or {}).get("name", ""),
                     "input": {}}
            out += self._begin("tool_use", block)
            out.append(self._delta({"type": "input_json_delta",
                                    "partial_json": json.dumps(_input(call), ensure_ascii=False)}))
            out += self._end()
        return out

    def close(self) -> list[dict]:
        out = self._end()
        if not self._any:  # an empty answer is still one (empty) text block, as the whole message has
            out += self._begin("text", {"type": "text", "text": ""}) + self._end()
        return out
