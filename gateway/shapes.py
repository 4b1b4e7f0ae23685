"""OpenAI response objects: chat.completion, text_completion and their streamed chunks."""

from __future__ import annotations

import time
from typing import Any

from protocol.client import Result

SYSTEM_FINGERPRINT = "lmx-supervisor"


def usage(u: dict) -> dict[str, Any]:
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if "cached_tokens" in u:  # prompt tokens the worker's prefix cache served, as OpenAI reports them
        out["prompt_tokens_details"] = {"cached_tokens": int(u["cached_tokens"])}
    return out


class Shaper:
    """Builds every object of one response, so they share id, created and model."""

    def __init__(self, chat: bool, model: str, request_id: str) -> None:
        self.chat = chat
        self.model = model
        # The supervisor logs the same request id: a client's response id finds its log lines.
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def full(self, result: Result) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": None, "finish_reason": result.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(result.usage)}

    def _chunk(self, delta: dict | str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def opening(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role and empty content, as OpenAI's do."""
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else None

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text} if self.chat else text, None)

    def closing(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({} if self.chat else "", finish_reason)

    def usage_chunk(self, u: dict) -> dict[str, Any]:
        """stream_options.include_usage: one more chunk, no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(u)}
