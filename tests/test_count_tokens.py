"""Counting a prompt's tokens without generating (`count_tokens` on the wire): the worker renders the
prompt exactly as a generation would (chat template, tools, template switches) and answers between
two batch steps, never behind the batch; it is routed like a generation (unknown model, bounds,
bad input: typed errors, and the worker lives); a worker from before the message is refused it
clearly instead of being sent what it would drop. Real supervisor, real workers."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol import limits
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(240)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    agent = write_tiny_llama(tmp_path_factory.mktemp("models") / "agent", agent=True)
    s = RunningSupervisor(tmp_path_factory.mktemp("count"), [
        {"id": "tiny", "path": str(tiny_model), "max_batch_size": 4},
        {"id": "agent", "path": str(agent), "canary": {"prompt": "Hi", "max_tokens": 4}},
        # A worker whose hello predates `capabilities` (an adopted older one).
        {"id": "older", "path": str(tiny_model),
         "worker_command": [sys.executable, "-m", "tests.older_worker", "--older"]},
    ]).start()
    yield s
    s.cleanup()


def _prompt_tokens(sup: RunningSupervisor, model: str, **fields) -> int:
    return sup.client.complete(model, max_tokens=1, **fields).usage["prompt_tokens"]


@pytest.mark.parametrize("model, fields", [
    ("tiny", {"prompt": "Hello, world! " * 20}),
    ("tiny", {"messages": ASK}),
    ("agent", {"messages": ASK}),
    ("agent", {"messages": ASK, "tools": TOOLS}),
    ("agent", {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}),
    ("agent", {"messages": ASK, "tools": TOOLS, "tool_choice": "none"}),
], ids=["raw", "chat", "agent-chat", "tools", "template-switch", "tools-not-rendered"])
def test_the_count_is_the_prompt_a_generation_gets(sup: RunningSupervisor, model: str, fields: dict) -> None:
    counted = sup.client.count_tokens(model, **fields)
    assert counted == _prompt_tokens(sup, model, **fields)


def test_what_decides_the_prompt_changes_the_count(sup: RunningSupervisor) -> None:
    plain = sup.client.count_tokens("agent", messages=ASK)
    assert sup.client.count_tokens("agent", messages=ASK, tools=TOOLS) > plain  # the tools are rendered
    assert sup.client.count_tokens("agent", messages=ASK, tools=TOOLS, tool_choice="none") == plain
    # The template's switch closes the think block in the prompt: more tokens.
    assert sup.client.count_tokens("agent", messages=ASK, chat_template_kwargs={"enable_thinking": False}) > plain


def test_a_count_does_not_wait_for_the_batch(sup: RunningSupervisor) -> None:
    async def run() -> tuple[int, bool, float]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            streams = [client.generate("tiny", f"Story {i}:", max_tokens=2000) for i in range(2)]
            async with streams[0], streams[1]:
                for s in streams:
                    await s.__anext__()  # both decoding
                start = time.monotonic()
                n = await client.count_tokens("tiny", prompt="word " * 300)
                took = time.monotonic() - start
                running = all(s.result is None for s in streams)
            return n, running, took

    n, running, took = asyncio.run(run())
    assert n > 0 and running  # answered while both generations were still decoding
    assert took < 2.0, f"a count took {took:.3f}s beside a batch"


def test_bad_input_is_that_counts_bad_request_and_the_worker_lives(sup: RunningSupervisor) -> None:
    before = sup.model("agent")
    with pytest.raises(E.BadRequest, match="tool-call format"):  # a model without a call format
        sup.client.count_tokens("tiny", messages=ASK, tools=TOOLS)
    with pytest.raises(E.BadRequest, match="raw prompt"):
        sup.client.count_tokens("agent", prompt="Hi", tools=TOOLS)
    with pytest.raises(E.BadRequest, match="exactly one of prompt or messages"):
        sup.client.count_tokens("agent", prompt="Hi", messages=ASK)
    with pytest.raises(E.BadRequest, match="tools"):  # out of the wire's bounds: before the wire
        sup.client.count_tokens("agent", messages=ASK, tools=TOOLS * (limits.MAX_TOOLS + 1))
    with pytest.raises(E.UnknownModel):
        sup.client.count_tokens("nope", prompt="Hi")
    assert sup.client.count_tokens("agent", messages=ASK) > 0
    after = sup.model("agent")
    assert (after["state"], after["worker_pid"], after["restarts"]) == ("READY", before["worker_pid"], before["restarts"])


def test_a_worker_from_before_the_message_is_refused_it_not_left_to_drop_it(sup: RunningSupervisor) -> None:
    start = time.monotonic()
    with pytest.raises(E.BadRequest, match="predates count_tokens") as refused:
        sup.client.count_tokens("older", prompt="Hi", timeout_s=30)
    assert time.monotonic() - start < 5 and refused.value.details["reason"] == "worker_outdated"
    assert sup.client.complete("older", "Hi", max_tokens=2).usage["completion_tokens"] >= 1


def test_many_counts_at_once_each_get_their_own_answer(sup: RunningSupervisor) -> None:
    async def run() -> list[int]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return await asyncio.gather(*(client.count_tokens("tiny", prompt="word " * n) for n in range(1, 41)))

    counts = asyncio.run(run())
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_a_group_counts_on_rank_0_alone_and_goes_on_serving(make_supervisor, tiny_model: Path) -> None:
    from tests.test_groups import GROUP

    sup = make_supervisor([{"id": "big", "path": str(tiny_model), "group": GROUP},
                           {"id": "one", "path": str(tiny_model)}]).start()
    for fields in ({"prompt": "Hello, world!"}, {"messages": ASK}):
        assert sup.client.count_tokens("big", **fields) == sup.client.count_tokens("one", **fields)
    # The followers never saw the counts: the next generation runs in lockstep as before.
    grouped = sup.client.complete("big", "Hello", max_tokens=6)
    assert grouped.usage["completion_tokens"] >= 1
    assert grouped.usage["prompt_tokens"] == sup.client.count_tokens("big", prompt="Hello")
