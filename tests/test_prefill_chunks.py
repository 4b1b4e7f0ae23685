"""A long prompt is prefilled in bounded chunks, one per serve-loop step (worker.prefill): a client
that leaves stops costing the worker within one chunk, so the next request is not stuck behind a
prompt nobody waits for; and the progress counter moves per chunk, so a prompt whose prefill takes
many times the supervisor's prefill stall budget is progress, never WORKER_HUNG.

The model is the tiny llama with room for long prompts (max_position_embeddings 8192) and mlx-lm's
generate_step prefill step (2048 tokens): on the CPU backend a 5,000-7,500-token prompt takes
seconds to prefill, and one 2048-token step deep into it takes longer than the stall budget here."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until
from tests.snapshots import write_tiny_llama
from worker.prefill import MIN_TOKENS, ChunkSize

pytestmark = pytest.mark.timeout(300)

STALL_S = 3.0  # the supervisor's prefill_stall_s here
SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 17 tokens


def _long(tag: str, sentences: int = 300) -> str:
    return f"{tag}. " + SENTENCE * sentences  # ~5,100 tokens


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prefill")
    path = write_tiny_llama(root / "long", shape={"max_position_embeddings": 8192})
    s = RunningSupervisor(root / "sup", [{"id": "long", "path": str(path), "context_tokens": 8192,
                                          "prefill_step_size": 2048, "prefix_cache_bytes": 0}],
                          supervisor={"prefill_stall_s": STALL_S}).start()
    yield s
    s.cleanup()


def _unharmed(sup: RunningSupervisor, before: dict) -> None:
    after = sup.model("long")
    assert after["state"] == "READY"
    assert (after["worker_pid"], after["restarts"]) == (before["worker_pid"], before["restarts"])
    assert not [e for e in sup.events("worker.killed") if e.get("model") == "long"]


def test_a_prefill_many_times_the_stall_budget_is_progress_not_a_hang(sup: RunningSupervisor) -> None:
    before = sup.model("long")
    prompt = _long("stall", sentences=440)  # ~7,500 tokens
    assert sup.client.count_tokens("long", prompt=prompt) > 7000
    result = sup.client.complete("long", prompt, max_tokens=2)
    prefill_s = result.timings["first_token_s"]
    print(f"prefill of {result.usage['prompt_tokens']} tokens: {prefill_s:.1f}s against a {STALL_S}s stall budget")
    if prefill_s < 2 * STALL_S:
        pytest.skip(f"this backend prefills the prompt in {prefill_s:.1f}s: no stall budget to outlast")
    assert result.usage["completion_tokens"] >= 1
    _unharmed(sup, before)


def test_a_prompt_whose_client_left_stops_within_a_chunk(sup: RunningSupervisor) -> None:
    before = sup.model("long")

    async def run() -> tuple[float, float]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            start = time.monotonic()
            await client.complete("long", _long("measured"), max_tokens=1)
            full_s = time.monotonic() - start  # the whole prefill (one token more is nothing beside it)

            # Idle first: a "prefill" still showing from the request above would not be this one's.
            await asyncio.to_thread(wait_until, lambda: sup.model("long")["phase"] == "idle", 10, "the worker idle")
            gone = client.generate("long", _long("abandoned"), max_tokens=64)
            await gone._open()  # sent; its client reads nothing and leaves once prefill is under way
            await asyncio.to_thread(wait_until, lambda: sup.model("long")["phase"] == "prefill", 10,
                                    "the abandoned prompt prefilling")
            await gone.aclose()
            start = time.monotonic()
            short = await client.complete("long", "Hi", max_tokens=1)
            assert short.usage["completion_tokens"] == 1
            return full_s, time.monotonic() - start

    full_s, behind_s = asyncio.run(run())
    print(f"full prefill {full_s:.2f}s; a 1-word request behind the cancelled prompt {behind_s:.2f}s")
    assert behind_s < full_s / 4, (full_s, behind_s)
    _unharmed(sup, before)


def test_a_long_prompt_joining_the_batch_holds_a_running_stream_up_a_chunk_at_a_time(
        sup: RunningSupervisor) -> None:
    async def run() -> tuple[float, float, bool]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            talker = client.generate("long", "Tell me a story.", max_tokens=4000)
            await talker.__anext__()
            joiner = asyncio.ensure_future(client.complete("long", _long("joiner"), max_tokens=2))
            last, worst = time.monotonic(), 0.0
            async for _ in talker:
                now = time.monotonic()
                worst, last = max(worst, now - last), now
                if joiner.done():
                    break
            overlapped = joiner.done()
            prefill_s = (await joiner).timings["first_token_s"]
            await talker.aclose()
            return worst, prefill_s, overlapped

    worst, prefill_s, overlapped = asyncio.run(run())
    print(f"the stream's worst gap {worst:.2f}s beside a {prefill_s:.2f}s prefill")
    assert overlapped, "the stream ended before the long prompt was prefilled: make it longer"
    assert worst < max(1.5, prefill_s / 3), (worst, prefill_s)  # one 2048-token step: seconds


def test_chunks_shrink_toward_the_target_and_grow_back_to_the_step() -> None:
    chunks = ChunkSize(2048, target_s=0.5)
    assert chunks.n == 64  # a first chunk small enough for any backend
    for _ in range(6):
        chunks.took(chunks.n, 0.01)
    assert chunks.n == 2048  # a fast backend is at the configured step after a few chunks
    chunks.took(2048, 4.0)
    assert chunks.n == 256  # 2048 tokens in 4 s: 256 in the target's 0.5 s
    chunks.took(256, 1000.0)
    assert chunks.n == MIN_TOKENS
    chunks.took(MIN_TOKENS, 0.3)
    assert chunks.n == MIN_TOKENS  # within the target: kept
    assert ChunkSize(8).n == 8  # never past the configured step
