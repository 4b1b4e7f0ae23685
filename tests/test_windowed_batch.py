"""A request that decodes alone and is joined by a second one goes on, in the batch, exactly as it
would have alone: greedy output token for token. On sliding-window models (gemma3_text, gpt_oss:
a RotatingKVCache beside a KVCache) too, whose window has wrapped long before the join; the tiny
llama (KVCache only) is the control.

The move (worker.batch, worker.solo) hands the batch the solo's cache as it is and the token
generate_step had sampled ahead. The move before it trimmed the cache by one token and fed that
token again; a wrapped window cannot be trimmed (mlx-lm trims nothing and returns 0), so the token
went in twice and gemma3_text and gpt_oss wrote other text from the join on.

Two levels: real workers under a real supervisor, the second request sent once the first has
streamed three windows' worth of tokens; and one worker's Batcher in this process, joined at chosen
tokens (before the window wraps, as it wraps, long after, and at the first's very last token)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protocol.client import Result, SupervisorClient
from protocol.messages import Chunk, Chunks, Final, GenerateRequest
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.snapshots_windowed import WINDOW, WRITERS

pytestmark = pytest.mark.timeout(300)

ARCHS = ("gemma3_text", "gpt_oss", "llama")
PROMPT = "The worker loads a model"  # a raw prompt of 6 tokens: the window wraps after 2 generated
OTHER = "What is the capital of France?"
MAX_TOKENS = 160
JOIN_AFTER = 3 * WINDOW  # tokens the first has streamed when the second is sent


def _write(arch: str, dest: Path) -> Path:
    if arch == "llama":
        return write_tiny_llama(dest, dtype="float32", scale=0.2)
    return WRITERS[arch](dest)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("windowed")
    return {arch: _write(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, snapshots: dict[str, Path]):
    # No prefix cache: the run alone must not leave the joined run a different start.
    models = [{"id": arch, "path": str(path), "max_batch_size": 4, "stream_interval_s": 0.0,
               "prefix_cache_bytes": 0} for arch, path in snapshots.items()]
    s = RunningSupervisor(tmp_path_factory.mktemp("windowed-sup"), models).start(timeout_s=180)
    yield s
    s.cleanup()


async def _joined(sup: RunningSupervisor, model: str) -> tuple[Result, Result, list[str]]:
    """The first request alone, the second sent once the first has streamed JOIN_AFTER tokens: both
    results, and the order they ended in."""
    ended: list[str] = []

    async def second(client: SupervisorClient) -> Result:
        result = await client.complete(model, OTHER, max_tokens=8)
        ended.append("second")
        return result

    async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120.0) as client:
        task = None
        async with client.generate(model, PROMPT, max_tokens=MAX_TOKENS) as first:
            seen = 0
            async for chunk in first:
                seen += chunk.tokens
                if task is None and seen >= JOIN_AFTER:
                    task = asyncio.create_task(second(client))
        ended.append("first")
        assert task is not None, f"the first request ended after {seen} tokens"
        other = await task
    assert first.result is not None
    return first.result, other, ended


@pytest.mark.parametrize("arch", ARCHS)
def test_a_request_joined_mid_decode_writes_what_it_writes_alone(sup: RunningSupervisor, arch: str) -> None:
    alone = sup.client.complete(arch, PROMPT, max_tokens=MAX_TOKENS)
    other_alone = sup.client.complete(arch, OTHER, max_tokens=8)
    assert alone.usage["prompt_tokens"] < JOIN_AFTER  # the window wraps in the first's decode, before the join
    # Long enough that the second request lands while the first decodes, not after it ended.
    assert alone.usage["completion_tokens"] > JOIN_AFTER + 64, alone
    joined, other, ended = asyncio.run(_joined(sup, arch))
    assert ended == ["second", "first"]  # the second ran (and ended) while the first decoded
    assert joined.text == alone.text
    assert joined.usage["completion_tokens"] == alone.usage["completion_tokens"]
    assert other.text == other_alone.text


# --- one worker's Batcher in this process: the join at chosen tokens --------------------------


@pytest.fixture(scope="module")
def engines(snapshots: dict[str, Path]) -> dict:
    from worker.engine import Engine

    loaded = {}
    for arch in ("gemma3_text", "gpt_oss"):
        engine = Engine()
        engine.load(str(snapshots[arch]))
        loaded[arch] = engine
    return loaded


class _Run:
    """A Batcher (max_batch_size 4, a prefix cache of `prefix_bytes`), what it sends, and what its
    prefix cache is given to store: (tokens, each layer's KV offset)."""

    def __init__(self, engine, prefix_bytes: int = 0) -> None:  # type: ignore[no-untyped-def]
        from worker.batch import Batcher
        from worker.channel import Progress
        from worker.prefixcache import PrefixCache

        self.sent: list = []
        self.stored: list[tuple[list[int], list[int]]] = []
        prefix = PrefixCache("test", prefix_bytes)
        store = prefix.store

        def spied(tokens: list[int], cache: list, shared: bool = False) -> None:
            self.stored.append((list(tokens), [c.offset for c in cache]))
            store(tokens, cache, shared)

        prefix.store = spied  # type: ignore[method-assign]
        self.batcher = Batcher(engine, Progress(), self.sent.append, 4, 512, 0.0, prefix)

    def chunks(self) -> list[Chunk]:
        return [c for m in self.sent for c in (m.chunks() if isinstance(m, Chunks) else [m]) if isinstance(c, Chunk)]

    def final(self, rid: str) -> Final | None:
        return next((m for m in self.sent if isinstance(m, Final) and m.request_id == rid), None)

    def run(self, req: GenerateRequest, join: GenerateRequest | None = None, at: int = 0) -> Final:
        """`req` alone until it has written `at` tokens, then `join` beside it; until both end."""
        self.batcher.add(req)
        joined = join is None
        while not joined or self.final(req.request_id) is None or len(self.batcher):
            ended = self.final(req.request_id) is not None
            if not joined and (ended or sum(c.tokens for c in self.chunks() if c.request_id == req.request_id) >= at):
                assert join is not None and not ended, "the first ended before the join"
                self.batcher.add(join)
                joined = True
            self.batcher.step()
        final = self.final(req.request_id)
        assert final is not None
        return final


def _req(rid: str, prompt: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, "m", prompt, max_tokens=max_tokens)


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_joined_at_any_token_the_first_goes_on_as_alone(engines: dict, arch: str) -> None:
    engine = engines[arch]
    n = 4 * WINDOW
    alone = _Run(engine).run(_req("alone", PROMPT, n))
    assert alone.usage["completion_tokens"] == n, alone  # no early EOS: every join point below is mid-decode
    for at in (1, 2, 3, WINDOW, 3 * WINDOW, n - 2):
        run = _Run(engine)
        joined = run.run(_req("first", PROMPT, n), _req("second", OTHER, 4), at)
        assert (joined.text, joined.finish_reason) == (alone.text, alone.finish_reason), f"joined after {at} tokens"
        assert run.final("second") is not None


def test_a_join_at_the_last_token_ends_the_first_and_caches_what_its_kv_holds(engines: dict) -> None:
    """The token sampled ahead is the first's last: it ends there, as alone, and its prefix-cache
    entry names the tokens its KV holds (one fewer than it wrote: the last was never fed)."""
    engine = engines["gpt_oss"]
    n = 2 * WINDOW
    alone = _Run(engine).run(_req("alone", PROMPT, n))
    run = _Run(engine, prefix_bytes=1 << 24)
    joined = run.run(_req("first", PROMPT, n), _req("second", OTHER, 4), n - 1)
    assert (joined.text, joined.finish_reason, joined.usage["completion_tokens"]) == (alone.text, "length", n)
    prompt_tokens = joined.usage["prompt_tokens"]
    tokens, offsets = run.stored[0]  # the first's entry: it ended before the second
    assert len(tokens) == prompt_tokens + n - 1
    assert offsets == [len(tokens)] * len(offsets)  # every layer's KV: exactly those tokens


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny llama with think markers and a template that leaves a think block open: its random
    weights think on until a budget closes the block."""
    from worker.engine import Engine

    engine = Engine()
    engine.load(str(write_tiny_llama(tmp_path_factory.mktemp("thinker"), agent=True, dtype="float32", scale=0.2)))
    return engine


def test_a_thinking_budget_counts_the_token_sampled_ahead_once(thinker) -> None:  # type: ignore[no-untyped-def]
    """A budget (a logits processor generate_step has run one step ahead) moves with the request:
    joined just before, at and after the token where the budget forces the end marker, the request
    writes what it writes alone, so the token sampled ahead is counted once, neither skipped nor twice."""
    budget = 6

    def req(rid: str) -> GenerateRequest:
        return GenerateRequest(rid, "m", None, [{"role": "user", "content": "What is the weather in Paris?"}],
                               max_tokens=24, thinking_budget=budget, logprobs=True)

    alone = _Run(thinker).run(req("alone"))
    tokens = [e["token"] for e in alone.logprobs or []]
    assert "</think>" in tokens and tokens.index("</think>") == budget, tokens  # the budget closed the block
    for at in range(budget - 2, budget + 3):
        joined = _Run(thinker).run(req("first"), _req("second", OTHER, 4), at)
        assert [e["token"] for e in joined.logprobs or []] == tokens, f"joined after {at} tokens"
        assert (joined.reasoning, joined.text) == (alone.reasoning, alone.text)
