"""A request nobody waits for any more (cancelled by its client, or past its deadline) leaves nothing
behind: no prefix cache entry in memory or on disk, whether it ended mid-prefill or mid-decode;
only a finished request's KV is kept for the next turn. And what it cost is still counted: the tokens
it was sent are in lmx_generated_tokens_total, and while it runs it is in lmx_model_active_requests."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(300)

SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 17 tokens


def _long(tag: str) -> str:
    return f"{tag}. " + SENTENCE * 300  # ~5,100 tokens: seconds of prefill on the CPU backend


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("abandoned")
    path = write_tiny_llama(root / "m", shape={"max_position_embeddings": 8192})
    s = RunningSupervisor(root / "sup", [{"id": "cached", "path": str(path), "context_tokens": 8192}]).start()
    yield s
    s.cleanup()


def _disk(sup: RunningSupervisor) -> list[Path]:
    return sorted((sup.state_dir / "prefix-cache" / "cached").glob("*.safetensors"))


def _sample(text: str, name: str) -> float:
    found = re.search(rf'^{name}{{model="cached"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _looked_up(sup: RunningSupervisor) -> tuple[int, int]:
    pc = sup.model("cached")["prefix_cache"]
    return pc.get("hit_tokens", 0), pc.get("miss_tokens", 0)


async def _hit_tokens(sup: RunningSupervisor, client: SupervisorClient, prompt: str) -> int:
    """How many of `prompt`'s tokens the prefix cache serves: sent, looked up, cancelled at once."""
    n = await client.count_tokens("cached", prompt=prompt)
    hit, miss = _looked_up(sup)
    probe = client.generate("cached", prompt, max_tokens=2)
    await probe._open()
    await probe.aclose()
    now = await asyncio.to_thread(wait_until, lambda: (lambda h, m: (h, m) if h + m >= hit + miss + n else None)(
        *_looked_up(sup)), 30, "the lookup in a heartbeat")
    return now[0] - hit


def test_abandoned_requests_store_nothing_and_their_tokens_count(sup: RunningSupervisor) -> None:
    prompts = {"prefill": _long("Cancelled"), "deadline": _long("Expired"), "decode": "Zebras. " + SENTENCE * 20}

    async def abandon() -> tuple[dict, list[Path], int, float, float, float, dict[str, int]]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            await _hit_tokens(sup, client, "Hello")  # a heartbeat from after the canary's entry was kept
            base, base_files = sup.model("cached")["prefix_cache"], _disk(sup)
            def prefilling() -> bool:
                return sup.model("cached")["phase"] == "prefill"

            # Cancelled mid-prefill (idle first: a "prefill" still showing from the probe is not its).
            await asyncio.to_thread(wait_until, lambda: sup.model("cached")["phase"] == "idle", 10, "idle")
            gone = client.generate("cached", prompts["prefill"], max_tokens=64)
            await gone._open()
            await asyncio.to_thread(wait_until, prefilling, 10, "the cancelled prompt prefilling")
            await gone.aclose()
            # Past its deadline mid-prefill.
            with pytest.raises(E.RequestTimeout):
                await client.complete("cached", prompts["deadline"], max_tokens=64, timeout_s=2.0)
            # Cancelled mid-decode, with the tokens it was sent counted.
            tokens_before = _sample(await client.metrics(), "lmx_generated_tokens_total")
            decoding = client.generate("cached", prompts["decode"], max_tokens=4000)
            got = 0
            async for chunk in decoding:
                got += chunk.tokens
                if got >= 8:
                    break
            active = _sample(await client.metrics(), "lmx_model_active_requests")
            await decoding.aclose()
            assert decoding.result is None  # it had not finished: this is an abandoned answer
            await asyncio.to_thread(wait_until, lambda: sup.model("cached")["active"] == 0, 10,
                                    "the worker's confirmation of the cancel")
            active_after = _sample(await client.metrics(), "lmx_model_active_requests")
            # Were any of them kept, a lookup of its prompt would be served from the cache now.
            hits = {case: await _hit_tokens(sup, client, p) for case, p in prompts.items()}
            return base, base_files, got, tokens_before, active, active_after, hits

    base, base_files, got, tokens_before, active, active_after, hits = asyncio.run(abandon())
    assert (active, active_after) == (1.0, 0.0)
    assert all(n < 16 for n in hits.values()), hits  # a few template tokens at most, never the prompt
    after = sup.model("cached")["prefix_cache"]
    assert (after["entries"], after.get("disk_writes")) == (base["entries"], base.get("disk_writes"))
    assert _disk(sup) == base_files
    counted = _sample(sup.client.metrics(), "lmx_generated_tokens_total") - tokens_before
    assert counted >= got > 0, (counted, got)

    # What the checks above would have seen: a finished request's entry, in memory and on disk.
    sup.client.complete("cached", "Finished. " + SENTENCE * 20, max_tokens=4)  # disk: >= 256 tokens
    done = sup.wait_model("cached", lambda m: m["prefix_cache"].get("disk_writes", 0) > base.get("disk_writes", 0),
                          30, "the finished request's entry on disk")["prefix_cache"]
    assert done["entries"] == base["entries"] + 1
    assert len(_disk(sup)) == len(base_files) + 1


def test_a_cancel_that_empties_the_worker_shows_it_idle(sup: RunningSupervisor) -> None:
    """No step runs on an empty worker, so the cancel itself says it is idle: a phase left at
    "prefill" would tell operators (and the stall verdicts) of work that is not there."""
    async def run() -> None:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            gone = client.generate("cached", _long("Left"), max_tokens=64)
            await gone._open()
            await asyncio.to_thread(wait_until, lambda: sup.model("cached")["phase"] == "prefill", 10, "prefilling")
            await gone.aclose()
            await asyncio.to_thread(wait_until, lambda: sup.model("cached")["active"] == 0, 10, "the cancel confirmed")

    asyncio.run(run())
    wait_until(lambda: sup.model("cached")["phase"] == "idle", 5, "the idle phase after the cancel")
