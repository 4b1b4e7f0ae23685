"""OpenAI response objects: chat.completion, text_completion and their streamed chunks."""

from __future__ import annotations

import time
from typing import Any, AsyncGenerator

from protocol.client import GenerateStream, Result
from protocol.messages import Chunk

SYSTEM_FINGERPRINT = "lmx-supervisor"


def usage(u: dict) -> dict[str, Any]:
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if "cached_tokens" in u:  # prompt tokens the worker's prefix cache served, as OpenAI reports them
        out["prompt_tokens_details"] = {"cached_tokens": int(u["cached_tokens"])}
    return out


def _chat_logprobs(entries: list[dict]) -> dict[str, Any]:
    """choices[].logprobs of a chat response: the wire's entries are OpenAI's token objects already."""
    content = [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
                "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes")}
                                 for t in e.get("top_logprobs") or ()]} for e in entries]
    return {"content": content, "refusal": None}


class Shaper:
    """Builds every object of one response, so they share id, created and model."""

    def __init__(self, chat: bool, model: str, request_id: str, include_usage: bool = False) -> None:
        self.chat = chat
        self.include_usage = include_usage  # stream_options.include_usage: a last chunk with usage
        self.model = model
        # The supervisor logs the same request id: a client's response id finds its log lines.
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self._offset = 0  # completions' text_offset, carried across streamed chunks
        self._calls = 0  # streamed tool calls so far: each delta's `index`

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def _legacy_logprobs(self, entries: list[dict]) -> dict[str, Any]:
        """The completions endpoint's older shape: parallel lists, alternatives as token -> logprob."""
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or ()} for e in entries],
                "text_offset": offsets}

    def _logprobs(self, entries: list[dict] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return _chat_logprobs(entries) if self.chat else self._legacy_logprobs(entries)

    def full(self, result: Result) -> dict[str, Any]:
        logprobs = self._logprobs(result.logprobs)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                message["tool_calls"] = [_call(c) for c in result.tool_calls]
                message["content"] = result.text or None  # OpenAI's shape for a call with no text
            if result.reasoning:
                message["reasoning_content"] = result.reasoning  # as vLLM and SGLang name it
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(result.usage)}

    async def whole(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        async with stream:
            result = await stream.collect()
        yield self.full(result)

    async def events(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        # Leaving this generator any way (end, error, GeneratorExit, cancellation on disconnect)
        # goes through `async with stream`, which cancels the request if it still runs.
        async with stream:
            opened = False
            async for chunk in stream:
                if not opened:
                    opened = True
                    if (first := self.opening()) is not None:
                        yield first
                for obj in self.deltas(chunk):  # text, thinking, tool calls, logprobs
                    yield obj
            result = stream.result
            assert result is not None
        if not opened and (first := self.opening()) is not None:
            yield first
        yield self.closing(result.finish_reason)
        if self.include_usage:
            yield self.usage_chunk(result.usage)

    def _chunk(self, delta: dict | str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def opening(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role and empty content, as OpenAI's do."""
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else None

    def deltas(self, chunk: Chunk) -> list[dict[str, Any]]:
        """One streamed wire chunk as OpenAI chunks. Chat: thinking, text and each tool call in a
        chunk of its own (a client that reads only `delta.content` never sees the others), the
        chunk's logprobs on the first of them. A tool call's text is never content: it comes whole
        in one `delta.tool_calls` entry, with its index in the stream."""
        logprobs = self._logprobs(chunk.logprobs)
        if not self.chat:
            return [self._chunk(chunk.text, None, logprobs)] if chunk.text or logprobs else []
        deltas: list[dict[str, Any]] = []
        if chunk.reasoning:
            deltas.append({"reasoning_content": chunk.reasoning})
        if chunk.text:
            deltas.append({"content": chunk.text})
        for call in chunk.tool_calls:
            deltas.append({"tool_calls": [{"index": self._calls, **_call(call)}]})
            self._calls += 1
        if not deltas and logprobs:  # tokens whose text is still held back (a stop string may follow)
            deltas.append({"content": ""})
        return [self._chunk(d, None, logprobs if i == 0 else None) for i, d in enumerate(deltas)]

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text} if self.chat else text, None)

    def closing(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({} if self.chat else "", finish_reason)

    def usage_chunk(self, u: dict) -> dict[str, Any]:
        """stream_options.include_usage: one more chunk, no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(u)}


def _call(c: dict) -> dict[str, Any]:
    fn = c.get("function") or {}
    return {"id": c.get("id", ""), "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": fn.get("arguments", "{}")}}
