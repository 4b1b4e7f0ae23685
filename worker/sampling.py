"""Samplers that mlx compiles once. mlx-lm's make_sampler bakes temperature and top_p into
compiled functions as constants, so every new value recompiles (~1 s of CPU on the worker, per
value): a client cycling temperatures would stall every request on the model. As arrays, the
values are inputs, and one compilation serves them all."""

from __future__ import annotations

from typing import Any, Callable


def make(temperature: float, top_p: float, top_k: int = 0) -> Callable[[Any], Any]:
    """top_k stays an int (mlx-lm partitions by it): one compilation per distinct k, and clients use
    a handful."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if temperature == 0:
        return make_sampler(0.0)  # greedy: nothing to compile per value
    top = mx.array(top_p, dtype=mx.float32) if 0.0 < top_p < 1.0 else 0.0
    return make_sampler(temp=mx.array(temperature, dtype=mx.float32), top_p=top, top_k=top_k)
