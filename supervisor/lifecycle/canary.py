"""The canary that must pass before a model is routable: a greedy generation of the configured
prompt, for an embed model the vectors of that prompt and of fixed sentence pairs, for a rerank
model the scores of fixed documents against a fixed query, twice."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from protocol import embed as embedding
from protocol import errors as E
from protocol.messages import EmbedRequest, Embeddings, Error, Final, GenerateRequest, Message, RerankRequest, RerankScores
from supervisor import kinds
from supervisor.config import CanarySettings, ModelConfig
from supervisor.lifecycle.requests import RequestQueue

# The codes a worker's Death reads as (supervisor.workers.worker.Death.error): a local process's
# (supervisor.workers.classify), and a peer's rank lost with its host. A canary that meets one is
# no evidence about the model: its worker went away under it.
DEATH_CODES = frozenset({E.ErrorCode.WORKER_CRASHED, E.ErrorCode.WORKER_OOM, E.ErrorCode.WORKER_HUNG,
                         E.ErrorCode.PEER_UNAVAILABLE})


async def run_canary(c: CanarySettings, requests: RequestQueue, log: Any, model: ModelConfig | None = None) -> Final:
    """>= 1 token, and `expect` in the text when set, within `timeout_s`; else CANARY_FAILED /
    CANARY_TIMEOUT. A worker death during the canary keeps its own class (it is not the canary's).
    An embed `model`'s canary is embed_canary's, a rerank model's rerank_canary's."""
    if model is not None and model.kind == kinds.EMBED:
        return await embed_canary(c, model, requests, log)
    if model is not None and model.kind == kinds.RERANK:
        return await rerank_canary(c, model, requests, log)
    req = GenerateRequest("", "", messages=[{"role": "user", "content": c.prompt}],
                          max_tokens=c.max_tokens, temperature=0.0)
    out = await _result(c, req, requests, (Final, Error))
    assert isinstance(out, Final)
    tokens = out.usage.get("completion_tokens", 0)
    # completion_tokens counts the end-of-text token (as mlx_lm.server does): one token that ended
    # the answer with no text is a model that said nothing, as zero tokens is.
    if tokens < 1 or (tokens == 1 and out.finish_reason == "stop" and not out.text):
        raise E.CanaryFailed("canary generated no tokens")
    if c.expect is not None and c.expect not in out.text:
        raise E.CanaryFailed(f"canary output lacks {c.expect!r}: {out.text[:120]!r}", output=out.text[:200])
    log.info("model.canary_passed", tokens=tokens, text=out.text[:200], duration_s=out.timings.get("total_s"))
    return out


async def _result(c: CanarySettings, req: Any, requests: RequestQueue, ends: tuple[type, ...]) -> Message:
    """The canary request's last reply within `timeout_s`: an Error is raised (a death as itself,
    anything else as CANARY_FAILED), no reply in time is CANARY_TIMEOUT."""
    fut: asyncio.Future = asyncio.get_running_loop().create_future()

    def sink(msg: Message) -> None:
        if isinstance(msg, ends) and not fut.done():
            fut.set_result(msg)

    wrid = requests.add(req, sink, bounded=False)
    try:
        out = await asyncio.wait_for(asyncio.shield(fut), c.timeout_s)
    except asyncio.TimeoutError:
        requests.cancel(wrid)
        raise E.CanaryTimeout(f"canary produced no result within {c.timeout_s}s") from None
    if isinstance(out, Error):
        exc = out.to_exc()
        if exc.code in DEATH_CODES:
            raise exc
        raise E.CanaryFailed(f"canary failed: {exc.code.code}: {exc.message}")
    return out


# Two near-paraphrases and a sentence about something else: any working sentence encoder puts the
# first pair closer together than the first and the third. Fixed, so a pass is comparable over time.
NEAR = ("A man is playing a guitar.", "A man plays the guitar.")
UNRELATED = "The quarterly tax report is due on Friday."


async def embed_canary(c: CanarySettings, model: ModelConfig, requests: RequestQueue, log: Any) -> Final:
    """The vector of the canary prompt has the model's width (its pooling config's, else its
    hidden size) and is finite, and NEAR's pair is closer (cosine) than NEAR[0] and UNRELATED; else
    CANARY_FAILED. Its Final's text (the width and the two cosines, to two places) is what the
    registry compares across starts on one stack, as a generation's greedy text is."""
    start = time.monotonic()
    req = EmbedRequest("", model.id, [c.prompt, *NEAR, UNRELATED])
    out = await _result(c, req, requests, (Embeddings, Error))
    assert isinstance(out, Embeddings)
    vectors = embedding.unpack(out.data, out.dims)
    want = kinds.embed_dims(model.path)
    if len(vectors) != len(req.inputs) or (want is not None and out.dims != want):
        raise E.CanaryFailed(f"canary: {len(vectors)} vectors of {out.dims} for {len(req.inputs)} inputs "
                             f"(the model's width is {want})")
    if not all(math.isfinite(x) for v in vectors for x in v):
        raise E.CanaryFailed("canary: the embedding has a non-finite value (NaN or infinity)")
    near, far = _cosine(vectors[1], vectors[2]), _cosine(vectors[1], vectors[3])
    text = f"dims {out.dims} near {near:.2f} unrelated {far:.2f}"
    if not near > far:
        raise E.CanaryFailed(f"canary: a paraphrase is no closer than an unrelated sentence ({text})", output=text)
    total_s = round(time.monotonic() - start, 4)
    log.info("model.canary_passed", tokens=out.prompt_tokens, text=text, duration_s=total_s)
    return Final("", text, "stop", {"prompt_tokens": out.prompt_tokens, "completion_tokens": 0}, {"total_s": total_s})


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


async def rerank_canary(c: CanarySettings, model: ModelConfig, requests: RequestQueue, log: Any) -> Final:
    """A score per document, each finite, and the same scores again for the same request; else
    CANARY_FAILED. The query is NEAR[0], the documents NEAR[1], UNRELATED and the canary prompt.
    What it does not check: that the paraphrase outscores the unrelated sentence, which a real
    reranker does and a random-weight test model need not (docs/runbook.md, "Kinds of model").
    Its Final's text (the scores, to two places) is what the registry compares across starts."""
    start = time.monotonic()
    req = RerankRequest("", model.id, NEAR[0], [NEAR[1], UNRELATED, c.prompt])
    first, again = [await _result(c, req, requests, (RerankScores, Error)) for _ in range(2)]
    assert isinstance(first, RerankScores) and isinstance(again, RerankScores)
    if len(first.scores) != len(req.documents) or len(again.scores) != len(req.documents):
        raise E.CanaryFailed(f"canary: {len(first.scores)} and {len(again.scores)} scores for "
                             f"{len(req.documents)} documents")
    if not all(math.isfinite(x) for x in first.scores + again.scores):
        raise E.CanaryFailed(f"canary: a score is not finite (NaN or infinity): {first.scores}")
    text = "scores " + " ".join(f"{x:.2f}" for x in first.scores)
    if any(abs(a - b) > 1e-4 * max(1.0, abs(a)) for a, b in zip(first.scores, again.scores)):
        raise E.CanaryFailed(f"canary: the same request scored {again.scores} after {first.scores}", output=text)
    total_s = round(time.monotonic() - start, 4)
    log.info("model.canary_passed", tokens=first.prompt_tokens, text=text, duration_s=total_s)
    return Final("", text, "stop", {"prompt_tokens": first.prompt_tokens, "completion_tokens": 0},
                 {"total_s": total_s})
