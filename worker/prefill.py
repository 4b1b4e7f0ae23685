"""Prompt work in bounded chunks: one chunk per serve-loop step, so a cancel takes effect between
chunks (a client that left stops costing the worker within one chunk) and the progress counter moves
after each (the supervisor's prefill stall verdict judges a chunk, never a whole prompt).

A chunk is at most the model's prefill_step_size tokens (mlx-lm's prefill step), and fewer when
chunks run long: attention grows with the context already in the cache, so on a slow backend a
chunk deep into a long prompt can take minutes at the configured size. ChunkSize aims each chunk at
TARGET_S seconds, starting small and doubling while chunks stay well under it (a fast backend is at
the configured size after a few chunks; each costs milliseconds there)."""

from __future__ import annotations

import time
from typing import Any

TARGET_S = 0.5  # what one chunk should take: far under any stall budget, a few per heartbeat
MIN_TOKENS = 16  # below this a chunk costs more in per-call overhead than it bounds
START_TOKENS = 64  # the first chunk's size (or the step, if smaller): grown from there


class ChunkSize:
    """How many prompt tokens the next chunk takes, from how long the last ones took."""

    def __init__(self, step: int, target_s: float = TARGET_S) -> None:
        self.step = max(1, step)
        self.target_s = target_s
        self.n = min(self.step, START_TOKENS)

    def took(self, tokens: int, seconds: float) -> None:
        """A chunk of `tokens` took `seconds`: shrink toward the target, or grow (at most double)."""
        if tokens <= 0:
            return
        if seconds > self.target_s:
            self.n = max(min(MIN_TOKENS, self.step), min(self.n, int(tokens * self.target_s / seconds)))
        elif seconds < self.target_s / 2 and tokens >= self.n:
            self.n = min(self.step, self.n * 2)


def run_chunk(model: Any, cache: list, tokens: list[int]) -> None:
    """Feed `tokens` through the model into `cache` (what mlx-lm's generate_step does per prefill
    step, on its generation stream)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    with mx.stream(generation_stream):
        model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])
    mx.clear_cache()


def next_chunk(model: Any, solo: Any, n: int) -> float | None:
    """`solo`'s (worker.solo.Solo) next chunk of `n` prompt tokens, fed into its cache: the seconds
    it took. Once at most one chunk is left, generate_step takes the rest (its first step prefills
    it and samples the first token) and None: the caller takes its tokens. A group's ranks call it
    with the size rank 0 chose (worker.group), so that they all run the same chunks."""
    if solo.tokens_gen is None and len(solo.rest) - 1 > n:
        began = time.monotonic()
        run_chunk(model, solo.cache, solo.rest[:n])
        solo.rest = solo.rest[n:]
        return time.monotonic() - began
    if solo.tokens_gen is None:
        start(model, solo, n)
    return None


def solo_chunk(model: Any, chunks: ChunkSize, solo: Any) -> bool:
    """A lone request's next prompt chunk, timed into `chunks`: True; False once generate_step runs."""
    n = chunks.n
    took = next_chunk(model, solo, n)
    if took is None:
        return False
    chunks.took(n, took)
    return True


def start(model: Any, solo: Any, step: int) -> None:
    """generate_step for what is left of `solo`'s prompt (at most one `step` of it: the caller fed
    the rest in chunks)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    solo.tokens_gen = generate_step(mx.array(solo.rest), model, prompt_cache=solo.cache, sampler=solo.sampler,
                                    max_tokens=solo.limit, prefill_step_size=step,
                                    logits_processors=solo.processors or None)
