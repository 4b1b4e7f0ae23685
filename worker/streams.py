"""One request's text as its tokens come: detokenizing, thinking and tool calls told apart from the
answer (worker.shaping), stop strings, and how much may be shown yet (the tail that could still grow
into a stop string is held back). Written once for every serving path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import GenerateRequest
from worker import streamend


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def find_stop(text: str, stops: list[str], emitted: int) -> tuple[int, str] | None:
    """(where the first stop string starts in `text`, which one), looking only where a new one
    could be."""
    hits = [(text.find(s, max(0, emitted - len(s))), s) for s in stops if s]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None


@dataclass
class Stream:
    req: GenerateRequest
    detok: Any
    prompt: list[int]  # every prompt token, the cached ones included
    cached_tokens: int = 0  # how many of them came from the prefix cache
    prefix_clears: int = 0  # the prefix cache's clear count when it started (a clear since: store nothing)
    checkpoint: tuple | None = None  # its prompt-end entry (worker.checkpoint), stored only once it finishes
    start: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    text: str = ""
    emitted: int = 0
    tokens: int = 0
    generated: list[int] = field(default_factory=list)  # every token fed back, EOS included
    shaper: Any = None  # worker.shaping.Shaper: thinking and tool calls apart (None: plain text)
    logprobs: list[dict] | None = None  # every token's, when asked for
    _logprobs_sent: int = 0
    stop_sequence: str | None = None  # the stop string that ended it

    def on_token(self, token: int, finish_reason: str | None, now: float) -> tuple[str, int, bool]:
        """(text that may be shown now, generated tokens in it, whether a stop string ended the
        stream). "stop" as finish_reason is the EOS token itself: never shown, counted only as a
        generated token (usage's definition, as mlx_lm.server's). The end never shows a character
        the model did not finish (worker.streamend)."""
        if self.first_token_s is None:
            self.first_token_s = now - self.start
        self.generated.append(token)
        if finish_reason != "stop":
            self.detok.add_token(token)
            self.tokens += 1
        piece = self.detok.last_segment if finish_reason is None else streamend.finish(self.detok)
        self.text += piece if self.shaper is None else self.shaper.feed(piece, finish_reason)
        found = find_stop(self.text, self.req.stop, self.emitted)
        if found is not None:
            cut, self.stop_sequence = found
            self.text = self.text[:cut]
            return self._take(len(self.text)), 1, True
        if self.shaper is not None and self.shaper.tool_calls and not self.req.parallel_tool_calls:
            return self._take(len(self.text)), 1, True  # one call asked for: it has closed
        safe = len(self.text) if finish_reason else len(self.text) - stop_holdback(self.text, self.req.stop)
        return self._take(safe), 1, False

    def _take(self, upto: int) -> str:
        out = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out

    def extras(self) -> dict:
        """What this stream has beside text since the last call: thinking, finished tool calls,
        logprobs (Chunk's fields)."""
        out = self.shaper.take() if self.shaper is not None else {}
        if self.logprobs is not None and len(self.logprobs) > self._logprobs_sent:
            out["logprobs"] = self.logprobs[self._logprobs_sent:]
            self._logprobs_sent = len(self.logprobs)
        return out

    def final_fields(self, reason: str) -> tuple[str, dict]:
        """(finish_reason, Final's fields beside text, usage and timings)."""
        out: dict = {"logprobs": self.logprobs, "stop_sequence": self.stop_sequence}
        if self.shaper is not None:
            out.update(reasoning=self.shaper.reasoning, tool_calls=self.shaper.tool_calls)
            if reason == "stop" and self.shaper.tool_calls:
                reason = "tool_calls"
        return reason, out

    def usage(self) -> dict[str, int]:
        """completion_tokens: every token the model generated for the answer, the EOS that ended it
        included (docs/gateway.md, "Responses")."""
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.generated),
                "cached_tokens": self.cached_tokens}

    def timings(self, now: float) -> dict[str, float]:
        total = now - self.start
        first = self.first_token_s or total
        return {"first_token_s": first, "total_s": total,
                "decode_tokens_per_s": (self.tokens - 1) / (total - first)
                if self.tokens > 1 and total > first else 0.0}
