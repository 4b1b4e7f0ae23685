"""OpenAI Responses API objects: the `response` object with its output items (reasoning, message,
function_call), the streamed event sequence the openai SDK's accumulator parses (response.created
… response.completed), and their framing: named events numbered by sequence_number, OpenAI's
`error` event then `response.failed` for a failure after the stream opened. A whole response is the
same accumulator run over the same chunks with its events dropped, so plain and streamed answers
cannot differ."""

from __future__ import annotations

import copy
import json
import time
from typing import Any, AsyncGenerator, Awaitable, Callable

from gateway.responses import ResponsesRequest
from gateway.sse import dumps
from protocol import errors as E
from protocol.client import GenerateStream, Result
from protocol.messages import Chunk

Saver = Callable[[dict], Awaitable[None]]


def usage(u: dict, reasoning_tokens: int) -> dict[str, Any]:
    inp, out = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": int(u.get("cached_tokens", 0))},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, out)},
            "total_tokens": inp + out}


class _Output:
    """The output items of one response as its chunks arrive: one item open at a time (reasoning or
    message, whose text grows; a function call, which arrives whole, stays open until the next item
    or the end, so a call cut by max_output_tokens ends `incomplete`). Every method returns the
    events it caused, without sequence numbers (Framing numbers what it frames)."""

    def __init__(self, rid: str, namespaces: dict[str, str]) -> None:
        self._rid = rid
        self._namespaces = namespaces
        self.items: list[dict] = []
        self._open: dict | None = None
        self.reasoning_tokens = 0

    def _ev(self, kind: str, **fields: Any) -> dict:
        return {"type": kind, "output_index": len(self.items) - 1, **fields}

    def _begin(self, item: dict, part: dict | None) -> list[dict]:
        out = self._end("completed")
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[item["type"]]
        item = {"id": f"{prefix}_{self._rid}_{len(self.items)}", **item}
        self.items.append(item)
        out.append(self._ev("response.output_item.added", item=copy.deepcopy(item)))
        if part is not None:
            item["content"].append(part)
            self._open = item
            out.append(self._ev("response.content_part.added", item_id=item["id"], content_index=0,
                                part=dict(part)))
        return out

    def _end(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        if item["type"] == "function_call":
            return [self._ev("response.function_call_arguments.done", item_id=item["id"], arguments=item["arguments"],
                             name=item["name"]),
                    self._ev("response.output_item.done", item=copy.deepcopy(item))]
        part, kind = item["content"][0], item["type"]
        text_kind = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
        extra = {"logprobs": []} if kind == "message" else {}
        head = {"item_id": item["id"], "content_index": 0}
        return [self._ev(text_kind, **head, text=part["text"], **extra),
                self._ev("response.content_part.done", **head, part=dict(part)),
                self._ev("response.output_item.done", item=copy.deepcopy(item))]

    def _grow(self, kind: str, text: str) -> list[dict]:
        out: list[dict] = []
        if self._open is None or self._open["type"] != kind:
            if kind == "message":
                item = {"type": "message", "role": "assistant", "status": "in_progress", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"type": "reasoning", "summary": [], "status": "in_progress", "content": []}
                part = {"type": "reasoning_text", "text": ""}
            out += self._begin(item, part)
        assert self._open is not None
        self._open["content"][0]["text"] += text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        out.append(self._ev(delta, item_id=self._open["id"], content_index=0, delta=text, **extra))
        return out

    def _call(self, call: dict) -> list[dict]:
        fn = call.get("function") or {}
        # A call cut short has its arguments as far as they were written, maybe none: kept as they are.
        args, name = fn.get("arguments", "{}"), fn.get("name", "")
        args = args if isinstance(args, str) else json.dumps(args)
        item = {"type": "function_call", "call_id": call.get("id", ""), "name": name, "arguments": "",
                "status": "in_progress"}
        if name in self._namespaces:
            item["namespace"] = self._namespaces[name]
        out = self._begin(item, None)
        self._open = item = self.items[-1]
        item["arguments"] = args
        out.append(self._ev("response.function_call_arguments.delta", item_id=item["id"], delta=args))
        return out

    def feed(self, chunk: Chunk) -> list[dict]:
        out: list[dict] = []
        if chunk.reasoning:
            out += self._grow("reasoning", chunk.reasoning)
            # The wire counts a chunk's tokens, not its thinking's: a chunk that carries more than
            # thinking (chunks a slow reader got merged) is split by characters.
            rest = len(chunk.text) + sum(len(str(c)) for c in chunk.tool_calls)
            self.reasoning_tokens += round(chunk.tokens * len(chunk.reasoning) / (len(chunk.reasoning) + rest))
        text = chunk.text
        if text and (self._open is None or self._open["type"] != "message"):
            # A message starts at its first visible character: the blank line a template writes
            # after `</think>` (or between calls) is no message of its own.
            text = text.lstrip()
        if text:
            out += self._grow("message", text)
        for call in chunk.tool_calls:
            out += self._call(call)
        return out

    def close(self, status: str) -> list[dict]:
        out = self._end(status)
        if not self.items:  # an empty answer is still one (empty) message, as output_text reads it
            out += self._grow("message", "")[:-1] + self._end(status)
        return out


class ResponseShaper:
    """Every object of one response: its id is the supervisor's request id, as on the other APIs."""

    def __init__(self, req: ResponsesRequest, request_id: str, save: Saver | None) -> None:
        self.id = "resp_" + request_id
        self._save = save  # the store's, awaited with the final response before it is sent
        self._output = _Output(request_id, req.namespaces)
        echo = req.body
        self._head = {
            "id": self.id, "object": "response", "created_at": int(time.time()), "model": req.model,
            "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "metadata": echo.get("metadata") or {},
            "parallel_tool_calls": echo.get("parallel_tool_calls") is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (echo.get("reasoning") or {}).get("effort"), "summary": None},
            "service_tier": echo.get("service_tier") or "default", "store": req.store,
            "temperature": req.temperature, "text": echo.get("text") or {"format": {"type": "text"}},
            "tool_choice": echo.get("tool_choice") or "auto", "tools": echo.get("tools") or [], "top_logprobs": 0,
            "top_p": req.top_p, "truncation": echo.get("truncation") or "disabled", "user": echo.get("user"),
        }

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return {**self._head, "status": status, "output": copy.deepcopy(self._output.items), "usage": None, **extra}

    def _final(self, result: Result) -> dict[str, Any]:
        cut = result.finish_reason == "length"
        extra: dict[str, Any] = {"usage": usage(result.usage, self._output.reasoning_tokens)}
        if cut:
            extra["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            extra["completed_at"] = int(time.time())
        return self.snapshot("incomplete" if cut else "completed", **extra)

    async def whole(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        async with stream:
            async for chunk in stream:
                self._output.feed(chunk)
            result = stream.result
            assert result is not None
        self._output.close("incomplete" if result.finish_reason == "length" else "completed")
        final = self._final(result)
        if self._save is not None:
            await self._save(final)
        yield final

    async def events(self, stream: GenerateStream) -> AsyncGenerator[dict, None]:
        """The streamed sequence. response.created waits for the first chunk, so a request refused
        before any token exists is an HTTP error with its status, as on the other APIs."""
        async with stream:  # leaving early any way cancels the generation
            started = False
            async for chunk in stream:
                if not started:
                    started = True
                    for obj in self._opening():
                        yield obj
                for obj in self._output.feed(chunk):
                    yield obj
            result = stream.result
            assert result is not None
        if not started:
            for obj in self._opening():
                yield obj
        for obj in self._output.close("incomplete" if result.finish_reason == "length" else "completed"):
            yield obj
        final = self._final(result)
        if self._save is not None:  # before the last event: a client that chains at once finds it stored
            await self._save(final)
        yield {"type": f"response.{final['status']}", "response": final}

    def _opening(self) -> list[dict]:
        return [{"type": "response.created", "response": self.snapshot("in_progress")},
                {"type": "response.in_progress", "response": self.snapshot("in_progress")}]


class Framing:
    """One response's SSE: named events, numbered in the order framed (sequence_number)."""

    def __init__(self) -> None:
        self._seq = 0

    def frame(self, obj: dict) -> bytes:
        obj = {**obj, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + obj["type"].encode() + b"\ndata: " + dumps(obj) + b"\n\n"

    def error(self, err: E.LmxError, shaper: ResponseShaper | None) -> bytes:
        """OpenAI's `error` event, then `response.failed` with the response as it stood."""
        param = err.details.get("param")
        out = self.frame({"type": "error", "code": err.code.code, "message": err.message,
                          "param": param if isinstance(param, str) else None})
        if shaper is not None:
            failed = shaper.snapshot("failed", error={"code": err.code.code, "message": err.message})
            out += self.frame({"type": "response.failed", "response": failed})
        return out
