"""Many clients at once against two models, with random cancellations and deadlines: every request
ends in text, CANCELLED, REQUEST_TIMEOUT or OVERLOADED (none hung, none lost), and the workers'
mlx memory returns to its idle level. Plus the perf gate: a broken fast path fails CI."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import wait_until

CLIENTS = 64


async def _one(client: SupervisorClient, rng: random.Random, i: int) -> str:
    model = "a" if i % 2 else "b"
    max_tokens = rng.randint(1, 120)
    cancel_after = rng.randint(1, 20) if rng.random() < 0.25 else None
    timeout_s = rng.uniform(0.05, 1.5) if rng.random() < 0.25 else None
    try:
        stream = client.generate(model, f"Hello {i}", max_tokens=max_tokens, timeout_s=timeout_s)
        seen = 0
        async with stream:
            async for _ in stream:
                seen += 1
                if cancel_after is not None and seen >= cancel_after:
                    return "CANCELLED"  # leaving the block cancels it in the worker
        assert stream.result is not None and stream.result.usage["completion_tokens"] >= 1
        return "text"
    except (E.Overloaded, E.RequestTimeout, E.Cancelled) as exc:
        return exc.code.code


def test_64_clients_with_cancels_and_deadlines_all_end_and_memory_comes_back(make_supervisor,
                                                                             tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model), "max_batch_size": 8, "max_queue": 16},
                           {"id": "b", "path": str(tiny_model), "max_batch_size": 4, "max_queue": 8}]).start()
    idle = {m["id"]: m["memory"]["mlx_active_bytes"] for m in sup.status()["models"]}
    rng = random.Random(int(time.time()))

    async def run() -> list[str]:
        clients = [SupervisorClient(state_dir=sup.state_dir, timeout_s=60) for _ in range(8)]
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(_one(clients[i % 8], rng, i) for i in range(CLIENTS))), 120)
        finally:
            for c in clients:
                await c.close()

    outcomes = asyncio.run(run())
    assert len(outcomes) == CLIENTS and set(outcomes) <= {"text", "CANCELLED", "REQUEST_TIMEOUT", "OVERLOADED"}
    assert outcomes.count("text") >= 8
    # Nothing left behind: no request in flight, no slot held, both models still READY and blameless.
    def settled() -> dict | None:
        s = sup.status()
        ok = all(m["active"] == 0 and m["queued"] == 0 and m["state"] == "READY" for m in s["models"])
        return s if ok else None

    status = wait_until(settled, 30, "every request slot free")
    assert all(m["failures_in_window"] == 0 for m in status["models"])
    # mlx's active memory back at its idle level, per the heartbeats: the weights, and of the KV only
    # what the prefix cache keeps (within its budget); every request's own KV freed.
    def back() -> bool:
        return all(m["memory"]["mlx_active_bytes"] <= idle[m["id"]] * 1.05 + 2**20 + m["prefix_cache"]["bytes"]
                   and m["prefix_cache"]["bytes"] <= m["prefix_cache"]["budget_bytes"]
                   for m in sup.status()["models"])

    wait_until(back, 30, "worker memory back to idle")


@pytest.mark.timeout(180)
def test_perf_gate_supervised_throughput_is_not_broken(make_supervisor, tiny_model: Path) -> None:
    """Generous on purpose (CI machines are noisy): fails only on a clear regression of the fast
    path, e.g. a per-token sleep or copy. The real figures come from bench/serving.py."""
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny_model))
    prompt = tok.encode("Hello")

    def in_process() -> float:
        stamps = [time.perf_counter() for _ in mlx_lm.stream_generate(model, tok, prompt, max_tokens=200)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()

    async def supervised() -> float:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stamps: list[float] = []
            async for chunk in client.generate("m", "Hello", max_tokens=200):
                stamps.extend([time.perf_counter()] * chunk.tokens)
            return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    base = max(in_process() for _ in range(3))
    through = max(asyncio.run(supervised()) for _ in range(3))
    assert through >= 0.5 * base, f"supervised {through:.0f} tok/s vs in-process {base:.0f} tok/s"
