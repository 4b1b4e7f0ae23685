"""mlx-lm inside the worker: load a snapshot, generate with streaming, stop strings and cancel."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import psutil

from protocol.messages import GenerateRequest
from worker.channel import Progress
from worker import sampling


class Cancelled(Exception):
    pass


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Where the first stop string starts in `text`, looking only where a new one could be."""
    hits = [text.find(s, max(0, emitted - len(s))) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


class Engine:
    """Owns the model and tokenizer. Importing mlx happens here and only here."""

    def __init__(self, progress: Progress) -> None:
        import mlx.core as mx  # deferred: the memory limit must be in place before mlx loads
        import mlx_lm

        self._mx = mx
        self._mlx_lm = mlx_lm
        self._progress = progress
        self._proc = psutil.Process()
        self.model = None
        self.tokenizer = None

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

    def prompt_tokens(self, req: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if req.messages is not None:
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=True)
                return list(ids)
            text = "\n".join(str(m.get("content", "")) for m in req.messages)
        else:
            text = req.prompt or ""
        return list(tok.encode(text))

    def generate(
        self, req: GenerateRequest, emit: Callable[[str, int], None]
    ) -> Outcome:
        """Stream one request; `emit(text, tokens)` per generated token. Raises Cancelled."""
        if req.seed is not None:
            self._mx.random.seed(req.seed)
        prompt = self.prompt_tokens(req)
        sampler = sampling.make(req.temperature, req.top_p)
        progress = self._progress
        start = time.monotonic()
        first_token_s = None
        text, emitted, tokens, finish = "", 0, 0, "length"
        progress.phase = "prefill"

        def on_prefill(done: int, total: int) -> None:
            progress.count += 1

        for resp in self._mlx_lm.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=req.max_tokens,
            sampler=sampler, prompt_progress_callback=on_prefill,
        ):
            if req.request_id in progress.cancelled:
                raise Cancelled()
            progress.phase = "decode"
            progress.count += 1
            if first_token_s is None:
                first_token_s = time.monotonic() - start
            real_token = not (resp.finish_reason == "stop")
            text += resp.text
            tokens += int(real_token)
            cut = find_stop(text, req.stop, emitted)
            if cut is not None:
                text, finish = text[:cut], "stop"
                emit(text[emitted:], int(real_token))
                emitted = len(text)
                break
            safe = len(text) - stop_holdback(text, req.stop) if resp.finish_reason is None else len(text)
            if real_token or safe > emitted:
                emit(text[emitted:safe], int(real_token))
                emitted = safe
            if resp.finish_reason:
                finish = resp.finish_reason
        progress.phase = "idle"
        total_s = time.monotonic() - start
        return Outcome(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=tokens,
            timings={
                "first_token_s": first_token_s or total_s,
                "total_s": total_s,
                "decode_tokens_per_s": (tokens - 1) / (total_s - first_token_s)
                if first_token_s is not None and tokens > 1 and total_s > first_token_s else 0.0,
            },
        )
