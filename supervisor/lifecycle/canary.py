"""The canary: a greedy generation of the configured prompt that must pass before a model is routable."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol import errors as E
from protocol.messages import Error, Final, GenerateRequest, Message
from supervisor.config import CanarySettings
from supervisor.lifecycle.requests import RequestQueue

# The codes a worker's Death reads as (supervisor.workers.worker.Death.error): a local process's
# (supervisor.workers.classify), and a peer's rank lost with its host. A canary that meets one is
# no evidence about the model: its worker went away under it.
DEATH_CODES = frozenset({E.ErrorCode.WORKER_CRASHED, E.ErrorCode.WORKER_OOM, E.ErrorCode.WORKER_HUNG,
                         E.ErrorCode.PEER_UNAVAILABLE})


async def run_canary(c: CanarySettings, requests: RequestQueue, log: Any) -> Final:
    """>= 1 token, and `expect` in the text when set, within `timeout_s`; else CANARY_FAILED /
    CANARY_TIMEOUT. A worker death during the canary keeps its own class (it is not the canary's)."""
    req = GenerateRequest("", "", messages=[{"role": "user", "content": c.prompt}],
                          max_tokens=c.max_tokens, temperature=0.0)
    fut: asyncio.Future = asyncio.get_running_loop().create_future()

    def sink(msg: Message) -> None:
        if isinstance(msg, (Final, Error)) and not fut.done():
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
    tokens = out.usage.get("completion_tokens", 0)
    if tokens < 1:
        raise E.CanaryFailed("canary generated no tokens")
    if c.expect is not None and c.expect not in out.text:
        raise E.CanaryFailed(f"canary output lacks {c.expect!r}: {out.text[:120]!r}", output=out.text[:200])
    log.info("model.canary_passed", tokens=tokens, text=out.text[:200], duration_s=out.timings.get("total_s"))
    return out
