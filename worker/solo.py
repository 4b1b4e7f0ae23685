"""The request that runs alone (worker.batch): mlx-lm's generate_step over a cache of its own, and
how it joins the batch when company comes, going on there exactly as it would have gone on alone.

generate_step runs one step ahead: when it yields a token, that token's KV is in the cache already
and the next token is sampled (its forward pass queued). So the move takes that next token, the
lookahead, as the solo's own (it is what the solo would have yielded next) and hands the batch the
cache as it is with the lookahead to feed first: nothing is trimmed, recomputed or fed twice.

The old move trimmed the cache back by one token and fed that token again. That is exact for a
KVCache only: a sliding window (RotatingKVCache) that has wrapped cannot be trimmed (mlx-lm trims
nothing and says so only in its return value), so the last token went in twice and the model went
on from a context it never had (gemma3, gpt_oss: other text than alone)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Solo:
    """The one request running alone, with the cache it fills: prompt chunks, then generate_step's."""
    tokens_gen: Any
    cache: list
    rest: list[int]  # the prompt tokens not in the cache yet (then: those generate_step was given)
    sampler: Any
    limit: int = 0  # its max_tokens: generate_step yields at most this many
    yielded: int = 0
    processors: list = field(default_factory=list)  # solo-safe ones only (a thinking budget)
    behind: int = 0  # its stream's last tokens whose KV is not in `cache` (1 once the lookahead is taken)


def lookahead(solo: Solo) -> tuple[int, Any]:
    """(the token generate_step sampled after the last one it yielded, its logprobs): read from the
    suspended generator (mlx-lm 0.32's generate_step: `next_y`, `next_logprobs`), whose next step
    would feed it. The solo counts it as yielded; its cache is one token behind its stream now."""
    if solo.tokens_gen is None or solo.yielded == 0:
        raise RuntimeError("no token is sampled ahead before generate_step's first")
    local = inspect.getgeneratorlocals(solo.tokens_gen)
    if "next_y" not in local or "next_logprobs" not in local:
        raise RuntimeError("this mlx-lm's generate_step keeps no sampled-ahead token where 0.32's does")
    solo.yielded += 1
    solo.behind = 1
    return int(local["next_y"].item()), local["next_logprobs"]


def rebase_processors(processors: list, known: list[int]) -> None:
    """generate_step's logits processors, handed to the batch after the lookahead: their next call
    (the batch's first) has the context `known` (every token in the cache, all of which they have
    consumed in generate_step's calls) and then the lookahead, which is new to them. rebase() makes
    the next call fix the context's base; this call fixes it at `known` (its logits are unused)."""
    import mlx.core as mx

    for p in processors:
        p.rebase()
        p(mx.array(known), mx.zeros((1, 1)))
