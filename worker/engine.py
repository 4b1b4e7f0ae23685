"""mlx-lm inside the worker: load a snapshot, turn a request into prompt tokens, report memory."""

from __future__ import annotations

import time
from typing import Any

import psutil

from protocol import limits
from protocol.errors import BadRequest
from protocol.messages import GenerateRequest
from worker import render


class Engine:
    """Owns the model and tokenizer. Importing mlx happens here and only here."""

    def __init__(self) -> None:
        import mlx.core as mx  # deferred: the memory limit must be in place before mlx loads
        import mlx_lm

        self._mx = mx
        self._mlx_lm = mlx_lm
        self._proc = psutil.Process()
        self.model = None
        self.tokenizer = None
        self.progress: Any = None  # worker.channel.Progress, set once serving: a render's phase

    def versions(self) -> dict:
        return {"mlx": self._mx.__version__, "mlx_lm": self._mlx_lm.__version__}

    def memory(self) -> dict:
        mx = self._mx
        return {
            "rss_bytes": self._proc.memory_info().rss,
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
        }

    def set_memory_limit(self, limit_bytes: int) -> None:
        self._mx.set_memory_limit(limit_bytes)

    def load(self, path: str) -> float:
        start = time.monotonic()
        self.model, self.tokenizer = self._mlx_lm.load(path)
        return time.monotonic() - start

    def uses_tools(self, req: GenerateRequest) -> bool:
        """The request's tools go to the template and calls are parsed back; a model whose template
        has no call format cannot take them (ValueError: the request's BAD_REQUEST)."""
        if not req.tools or req.tool_choice == "none":
            return False
        if req.messages is None:
            raise ValueError("tools: a tool call needs a chat (messages), not a raw prompt")
        if not self.tokenizer.has_tool_calling:
            raise ValueError("tools: this model's chat template has no tool-call format mlx-lm knows")
        return True

    def prompt_tokens(self, req: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if req.messages is not None:
            if getattr(tok, "chat_template", None):
                return self._chat_tokens(req)
            text = "\n".join(str(m.get("content", "")) for m in req.messages)
        else:
            text = req.prompt or ""
        return list(tok.encode(text))

    def _chat_tokens(self, req: GenerateRequest) -> list[int]:
        """The chat template rendered to text (bounded: worker.render), then tokenized as mlx-lm's
        own tokenize=True path does. The request's chat_template_kwargs are template variables only,
        checked again here: a frame that skipped the supervisor's checks still cannot name a
        parameter of apply_chat_template (ValueError: the request's BAD_REQUEST)."""
        tok = self.tokenizer
        try:
            limits.check_template_kwargs(req.TAG, req.chat_template_kwargs)
        except BadRequest as exc:
            raise ValueError(exc.message) from None
        extra: dict[str, Any] = dict(req.chat_template_kwargs or {})
        if self.uses_tools(req):
            extra["tools"] = req.tools
        text = render.bounded(lambda: tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                                              tokenize=False, **extra), self.progress)
        ids = list(tok.encode(text, add_special_tokens=False))
        if not all(type(i) is int for i in ids):
            raise ValueError("the tokenizer did not return token ids")
        return ids
