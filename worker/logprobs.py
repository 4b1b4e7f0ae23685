"""OpenAI's logprobs shape for one generated token, from the step's log-probabilities."""

from __future__ import annotations

from typing import Any


def token_logprobs(tokenizer: Any, token: int, logprobs: Any, top: int) -> dict:
    """OpenAI's shape for one chosen token: its text, bytes, log-probability, and the `top` most
    likely tokens at that step. `logprobs` is the step's normalized log-probabilities (mlx-lm's)."""
    import mlx.core as mx

    def entry(tid: int, lp: float) -> dict:
        text = tokenizer.decode([tid])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    out = entry(token, logprobs[token].item())
    out["top_logprobs"] = []
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[ids]
        order = mx.argsort(-vals)
        out["top_logprobs"] = [entry(int(i), float(v)) for i, v in zip(ids[order].tolist(), vals[order].tolist())]
    return out
