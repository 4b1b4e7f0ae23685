"""Prefix reuse on models whose caches cannot be trimmed back (worker.checkpoint): the cache state at
the end of each prompt is kept, so the next turn of a chat, which extends that prompt, prefills only
what is new. gemma3_text and gpt_oss (a RotatingKVCache whose window of a few tokens the template
alone wraps, beside a KVCache; a lone request runs on generate_step) and qwen3_next (an ArraysCache
beside a KVCache; always in mlx-lm's BatchGenerator), on tests.snapshots' byte-level BPE tokenizer
and ChatML template; the tiny llama (KVCache only, whose finished entries are trimmed back) is the
control.

Before the checkpoints, such a model kept only the KV its generation left (prompt and output), which
the next prompt never extends (the template renders the answer again, with its end token): turns 2+
found 0 cached tokens. A hit is exact or it is not used: every turn's greedy text equals that of the
same snapshot with its cache off, token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protocol.client import Result, SupervisorClient
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.snapshots_windowed import WRITERS

pytestmark = pytest.mark.timeout(300)

ARCHS = ("llama", "gemma3_text", "gpt_oss", "qwen3_next")
SYSTEM = ("You are the assistant of a small test. Answer each question briefly, in plain words, and "
          "stay on its topic; the conversation goes on for several turns. ") * 6
QUESTIONS = ["What does the supervisor do?", "And the worker, what is its part?",
             "How do the two of them talk?", "What happens when one of them crashes?"]
OTHER = ["Tell me about foxes.", "Why do they live in woods?", "What do they eat?"]
MAX_TOKENS = 12


def _write(arch: str, dest: Path) -> Path:
    if arch in WRITERS:
        return WRITERS[arch](dest)
    return write_tiny_llama(dest, dtype="float32", scale=0.3)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("checkpointed")
    models = []
    for arch in ARCHS:
        path = str(_write(arch, root / arch))
        models += [{"id": arch, "path": path, "max_batch_size": 4, "prefix_cache_bytes": 64 << 20},
                   {"id": f"{arch}-plain", "path": path, "max_batch_size": 4, "prefix_cache_bytes": 0}]
    s = RunningSupervisor(tmp_path_factory.mktemp("checkpointed-sup"), models).start(timeout_s=240)
    yield s
    s.cleanup()


async def _turns(client: SupervisorClient, model: str, questions: list[str], system: str) -> list[Result]:
    """A chat, one turn per question, each answer in the next turn's history."""
    history = [{"role": "system", "content": system}]
    out = []
    for q in questions:
        history.append({"role": "user", "content": q})
        r = await client.complete(model, messages=list(history), max_tokens=MAX_TOKENS)
        out.append(r)
        history.append({"role": "assistant", "content": r.text})
    return out


def _chats(sup: RunningSupervisor, model: str, chats: list[tuple[list[str], str]]) -> list[list[Result]]:
    """Several chats at once (turn k of each runs beside turn k of the others, in the batch)."""
    async def run() -> list[list[Result]]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120.0) as client:
            return await asyncio.gather(*(_turns(client, model, qs, system) for qs, system in chats))

    return asyncio.run(run())


def _covers_previous_prompt(turns: list[Result]) -> list[str]:
    """The turns (2+) whose cached tokens fall short of the previous turn's prompt (all of it but
    its last token, which the checkpoint leaves to be fed)."""
    return [f"turn {i + 1}: {t.usage['cached_tokens']} cached of {t.usage['prompt_tokens']}, "
            f"the previous prompt had {prev.usage['prompt_tokens']}"
            for i, (prev, t) in enumerate(zip(turns, turns[1:]), start=1)
            if t.usage["cached_tokens"] < prev.usage["prompt_tokens"] - 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_turn_of_a_chat_reuses_the_previous_prompt_and_writes_the_same_text(sup: RunningSupervisor,
                                                                                  arch: str) -> None:
    (hits,) = _chats(sup, arch, [(QUESTIONS, SYSTEM)])
    (refs,) = _chats(sup, f"{arch}-plain", [(QUESTIONS, SYSTEM)])
    assert [h.text for h in hits] == [r.text for r in refs]
    assert [h.usage["prompt_tokens"] for h in hits] == [r.usage["prompt_tokens"] for r in refs]
    assert all(r.usage["cached_tokens"] == 0 for r in refs)
    assert not _covers_previous_prompt(hits), _covers_previous_prompt(hits)
    assert hits[-1].usage["cached_tokens"] > 0.9 * hits[-1].usage["prompt_tokens"]


@pytest.mark.parametrize("arch", ARCHS)
def test_chats_side_by_side_in_the_batch_each_reuse_their_own_prompts(sup: RunningSupervisor, arch: str) -> None:
    # A system prompt of their own: nothing of the test above serves these.
    chats = [(QUESTIONS[:3], "Batch one. " + SYSTEM), (OTHER, "Batch two. " + SYSTEM)]
    hits, refs = _chats(sup, arch, chats), _chats(sup, f"{arch}-plain", chats)
    assert [[h.text for h in c] for c in hits] == [[r.text for r in c] for c in refs]
    for turns in hits:
        assert not _covers_previous_prompt(turns), _covers_previous_prompt(turns)


def test_a_request_cancelled_after_its_prompt_stores_nothing_and_a_finished_one_its_checkpoint(
        sup: RunningSupervisor) -> None:
    """An abandoned request stores nothing (issue 23's rule), its prompt-end checkpoint included,
    though its prompt was fully prefilled; the same prompt run to its end leaves an exact one."""
    messages = [{"role": "system", "content": "Cancelled. " + SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]

    async def cancelled() -> None:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120.0) as client:
            async with client.generate("gemma3_text", messages=messages, max_tokens=100_000) as stream:
                async for _ in stream:
                    break

    asyncio.run(cancelled())
    sup.wait_model("gemma3_text", lambda m: m["active"] == 0, 30, "the cancelled request gone")
    again = sup.client.complete("gemma3_text", messages=messages, max_tokens=MAX_TOKENS)
    assert again.usage["cached_tokens"] == 0
    third = sup.client.complete("gemma3_text", messages=messages, max_tokens=MAX_TOKENS)
    ref = sup.client.complete("gemma3_text-plain", messages=messages, max_tokens=MAX_TOKENS)
    assert again.text == third.text == ref.text
    assert third.usage["cached_tokens"] == third.usage["prompt_tokens"] - 1


def _wrapped_window(tokens: int) -> list:
    """A one-layer cache whose sliding window (4 tokens) has wrapped: it cannot be trimmed back."""
    import mlx.core as mx
    from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache

    c = RotatingKVCache(max_size=4)
    kv = mx.arange(tokens * 8, dtype=mx.float32).reshape(1, 1, tokens, 8)
    c.update_and_fetch(kv, kv)
    assert not can_trim_prompt_cache([c])
    return [c]


def test_checkpoints_count_their_bytes_once_and_outlast_finished_entries_under_the_budget() -> None:
    from worker.prefixcache import PrefixCache

    one = sum(c.nbytes for c in _wrapped_window(16))
    prefix = PrefixCache("m", budget_bytes=3 * one)
    first, second = list(range(16)), list(range(100, 116))
    prefix.checkpoint(first, _wrapped_window(16))
    prefix.checkpoint(first, _wrapped_window(16))  # the same prompt again: replaces, never counted twice
    assert prefix.stats()["bytes"] == one and prefix.stats()["entries"] == 1
    prefix.store(first[:-4] + [7, 7, 7, 7], _wrapped_window(16))  # a finished entry: prompt and answer
    assert prefix.stats()["bytes"] == 2 * one and prefix.stats()["entries"] == 2
    prefix.checkpoint(second, _wrapped_window(16))
    prefix.store(second[:-4] + [7, 7, 7, 7], _wrapped_window(16))  # past the budget: one entry goes
    assert prefix.stats()["bytes"] == 3 * one and prefix.evictions == 1
    # The least recently used went, but of the finished entries (the first's), not the first's
    # checkpoint, older: both checkpoints serve their next turn.
    for prompt in (first, second):
        cache, rest = prefix.fetch(prompt + [1, 2, 3])
        assert cache is not None and rest == [1, 2, 3]


def test_a_prompt_that_is_exactly_an_untrimmable_entry_starts_from_the_checkpoint_before_it() -> None:
    """A raw completion that continues an answer token for token: the finished entry holds the
    whole prompt and cannot be trimmed to leave its last token to feed; the checkpoint serves."""
    from worker.prefixcache import PrefixCache

    prefix = PrefixCache("m", budget_bytes=1 << 20)
    prompt = list(range(16))
    prefix.checkpoint(prompt, _wrapped_window(16))
    prefix.store(prompt + [7, 8, 9, 10], _wrapped_window(20))
    cache, rest = prefix.fetch(prompt + [7, 8, 9, 10])
    assert cache is not None and cache[0].offset == 16 and rest == [7, 8, 9, 10]
    assert prefix.fetch(list(range(50, 60))) == (None, list(range(50, 60)))
