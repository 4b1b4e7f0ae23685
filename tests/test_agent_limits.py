"""What agent clients ask the worker to limit, end to end through a real supervisor and workers: a
thinking budget (the model is made to close its think block with its own marker, then answers),
one tool call at most (`parallel_tool_calls` false), a call cut short by max_tokens coming back as
the partial call with finish_reason "length", and a prompt past the context carrying its figures.
Scripted models (tests/scripted_worker.py) write fixed texts; the free one is left to its random
weights, under the worker's own constraints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import ASK, BOUNDED_TOOLS, CALL, THINK_SCRIPT, TOOLS, _scripted

pytestmark = pytest.mark.timeout(300)

CALL2 = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
TWO_CALLS = f"Two cities.</think>\n\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{CALL2}\n</tool_call>"
CONTEXT_TOKENS = 128  # the canary's chat prompt fits


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    agent = write_tiny_llama(tmp_path_factory.mktemp("models") / "agent", agent=True)
    s = RunningSupervisor(tmp_path_factory.mktemp("limits"), [
        _scripted("thinker", agent, THINK_SCRIPT, max_batch_size=4),
        _scripted("caller", agent, TWO_CALLS),
        {"id": "free", "path": str(agent), "canary": {"prompt": "Hi", "max_tokens": 4}, "max_batch_size": 4},
        {"id": "short", "path": str(tiny_model), "context_tokens": CONTEXT_TOKENS},
    ]).start()
    yield s
    s.cleanup()


def _stream(sup: RunningSupervisor, model: str, **kwargs) -> tuple[list, object]:
    async def run() -> tuple[list, object]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate(model, **kwargs)
            chunks = [c async for c in stream]
            return chunks, stream.result

    return asyncio.run(run())


def _thinking_tokens(result) -> int:
    """Tokens written before the end-of-think marker (the request asked for logprobs)."""
    tokens = [e["token"] for e in result.logprobs]
    assert "</think>" in tokens, tokens
    return tokens.index("</think>")


# --- thinking budget ----------------------------------------------------------------------------


def test_a_thinking_budget_closes_the_block_and_the_model_answers(sup: RunningSupervisor) -> None:
    whole = sup.client.complete("thinker", messages=ASK, max_tokens=64, logprobs=True)
    assert _thinking_tokens(whole) > 3
    chunks, cut = _stream(sup, "thinker", messages=ASK, max_tokens=64, thinking_budget=3, logprobs=True)
    assert _thinking_tokens(cut) == 3
    assert whole.reasoning.startswith(cut.reasoning) and len(cut.reasoning) < len(whole.reasoning)
    assert cut.text.strip() == "The answer is 42." and cut.finish_reason == "stop"
    assert "".join(c.reasoning for c in chunks) == cut.reasoning
    assert "".join(c.text for c in chunks) == cut.text


def test_a_budget_of_zero_leaves_no_thinking(sup: RunningSupervisor) -> None:
    result = sup.client.complete("thinker", messages=ASK, max_tokens=64, thinking_budget=0, logprobs=True)
    assert _thinking_tokens(result) == 0 and result.reasoning.strip() == ""
    assert result.text.strip() == "The answer is 42."


def test_each_stream_in_the_batch_keeps_its_own_budget(sup: RunningSupervisor) -> None:
    async def run() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return await asyncio.gather(*(
                client.complete("thinker", messages=ASK, max_tokens=64, thinking_budget=b, logprobs=True)
                for b in (1, 2, 4, None)))

    *budgeted, free = asyncio.run(run())
    assert [_thinking_tokens(r) for r in budgeted] == [1, 2, 4]
    assert all(r.text.strip() == "The answer is 42." for r in budgeted)
    assert free.reasoning.strip() == "First, recall the facts."


def test_the_budget_holds_alone_and_across_the_move_into_the_batch(sup: RunningSupervisor) -> None:
    # The free model thinks at random from the template's open <think>: only the budget closes it.
    alone = sup.client.complete("free", messages=ASK, max_tokens=40, thinking_budget=5, logprobs=True)
    assert _thinking_tokens(alone) <= 5 and alone.usage["completion_tokens"] > 6

    async def run() -> tuple:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            first = client.generate("free", messages=ASK, max_tokens=60, thinking_budget=30, logprobs=True)
            async with first:
                await first.__anext__()  # running alone on generate_step
                company = await client.complete("free", "Hello", max_tokens=20)
                await first.collect()
            return first.result, company

    moved, company = asyncio.run(run())
    assert company.usage["completion_tokens"] >= 1
    assert _thinking_tokens(moved) <= 30


# --- one tool call --------------------------------------------------------------------------------


def test_parallel_tool_calls_false_ends_the_generation_at_the_first_call(sup: RunningSupervisor) -> None:
    both = sup.client.complete("caller", messages=ASK, tools=TOOLS, max_tokens=160)
    assert [json.loads(c["function"]["arguments"])["city"] for c in both.tool_calls] == ["Paris", "Rome"]
    chunks, one = _stream(sup, "caller", messages=ASK, tools=TOOLS, max_tokens=160, parallel_tool_calls=False)
    assert one.finish_reason == "tool_calls"
    (call,) = one.tool_calls
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert [tc for c in chunks for tc in c.tool_calls] == one.tool_calls
    assert one.usage["completion_tokens"] < both.usage["completion_tokens"]


def test_a_forced_call_with_parallel_tool_calls_false_is_exactly_one(sup: RunningSupervisor) -> None:
    result = sup.client.complete("free", messages=ASK, tools=BOUNDED_TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, max_tokens=200)
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)


# --- a call cut short by max_tokens ------------------------------------------------------------


def test_a_call_cut_short_comes_back_partial_with_finish_reason_length(sup: RunningSupervisor) -> None:
    whole = sup.client.complete("caller", messages=ASK, tools=TOOLS, max_tokens=160, parallel_tool_calls=False)
    n = whole.usage["completion_tokens"]
    seen = set()
    for cut in range(n - 6, n):  # cuts inside the first call's arguments and up to its end marker
        chunks, result = _stream(sup, "caller", messages=ASK, tools=TOOLS, max_tokens=cut)
        assert result.finish_reason == "length", cut
        (call,) = result.tool_calls
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        args = call["function"]["arguments"]
        assert '{"city": "Paris"}'.startswith(args) and args, (cut, args)
        assert [tc for c in chunks for tc in c.tool_calls] == result.tool_calls
        assert "tool_call" not in result.text
        seen.add(args)
    assert len(seen) > 1  # the cuts fell at different places in the arguments


def test_a_forced_call_cut_short_is_partial_not_lost(sup: RunningSupervisor) -> None:
    chunks, result = _stream(sup, "free", messages=ASK, tools=BOUNDED_TOOLS, tool_choice="function",
                             tool_name="get_weather", max_tokens=14)
    assert result.finish_reason == "length"
    (call,) = result.tool_calls
    assert call["function"]["name"] in ("", "get_weather")
    assert call["function"]["arguments"] == "" or call["function"]["arguments"].startswith("{")
    assert [tc for c in chunks for tc in c.tool_calls] == result.tool_calls


# --- context exceeded -------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"prompt": "word " * 200}, {"messages": [{"role": "user", "content": "word " * 200}]}])
def test_a_prompt_past_the_context_carries_its_figures(sup: RunningSupervisor, fields: dict) -> None:
    counted = sup.client.count_tokens("short", **fields)
    with pytest.raises(E.BadRequest, match="context_tokens") as refused:
        sup.client.complete("short", max_tokens=4, **fields)
    assert refused.value.details == {"reason": "context_length_exceeded", "prompt_tokens": counted,
                                     "context_tokens": CONTEXT_TOKENS}
    assert sup.client.complete("short", "Hi", max_tokens=2).usage["completion_tokens"] >= 1


# --- the budget's processor on its own: what it forces, token by token ------------------------------


def _forced(proc, context: list[int], width: int = 16):
    """The token `proc` forces after `context` (None: it leaves the logits alone)."""
    import mlx.core as mx

    logits = mx.zeros((1, width))
    out = proc(mx.array(context), logits)
    if mx.array_equal(out, logits).item():
        return None
    assert int(mx.sum(out > -mx.inf).item()) == 1  # all the mass on one token
    return int(mx.argmax(out, axis=-1).item())


def test_the_budget_forces_the_end_marker_and_only_inside_a_think_block() -> None:
    from worker.thinkbudget import ThinkBudget

    p = ThinkBudget(start=(5,), end=(6,), budget=2, thinking=True)
    assert _forced(p, [1, 2, 3]) is None
    assert _forced(p, [1, 2, 3, 10]) is None
    assert _forced(p, [1, 2, 3, 10, 11]) == 6
    assert _forced(p, [1, 2, 3, 10, 11]) == 6  # a call repeated at one position decides the same
    assert _forced(p, [1, 2, 3, 10, 11, 6]) is None  # closed: the answer is the model's
    assert _forced(p, [1, 2, 3, 10, 11, 6, 12, 5]) == 6  # a new block: the budget is spent already
    q = ThinkBudget(start=(5,), end=(6,), budget=3, thinking=False)
    assert _forced(q, [1]) is None and _forced(q, [1, 10, 11, 12, 13]) is None  # not thinking: no limit


def test_a_multi_token_end_marker_under_way_is_finished_not_restarted() -> None:
    from worker.thinkbudget import ThinkBudget

    p = ThinkBudget(start=(5,), end=(7, 8), budget=1, thinking=True)
    assert _forced(p, [1]) is None
    assert _forced(p, [1, 7]) == 8  # the model's own first half of the marker was its last token
    assert _forced(p, [1, 7, 8]) is None


def test_the_budget_survives_a_move_into_the_batch_and_leaves_tool_calls_alone() -> None:
    from worker.thinkbudget import ThinkBudget

    p = ThinkBudget(start=(5,), end=(6,), budget=3, thinking=True, tool_start=(9,))
    assert _forced(p, [1, 2]) is None and _forced(p, [1, 2, 10, 11]) is None
    p.rebase()  # the batch's context: the whole prompt and every token fed so far
    assert _forced(p, [0, 0, 1, 2, 10, 11]) is None  # nothing consumed twice
    assert _forced(p, [0, 0, 1, 2, 10, 11, 12]) == 6
    t = ThinkBudget(start=(5,), end=(6,), budget=2, thinking=True, tool_start=(9,))
    assert _forced(t, [1]) is None and _forced(t, [1, 9]) is None  # a call opened from thinking
    assert _forced(t, [1, 9, 10, 11, 12]) is None  # its arguments are never cut into
