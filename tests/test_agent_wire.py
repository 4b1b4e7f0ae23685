"""What agents need from the wire, end to end through a real supervisor and workers: thinking apart
from the answer, tool calls parsed by mlx-lm's own parser (never streamed as text), multi-turn tool
conversations through the template, logprobs alone and in the batch, and typed refusals. The model
writes a fixed script (tests/scripted_worker.py, a logits processor) on a tiny snapshot whose vocab
and chat template carry Qwen-style think and tool-call markers."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
THINK_SCRIPT = "First, recall the facts.</think>\n\nThe answer is 42."
CALL_SCRIPT = f"I should call the tool.</think>\n\nLet me check.<tool_call>\n{CALL}\n</tool_call>"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _scripted(model_id: str, path: Path, script: str, after_tool: str | None = None, **extra) -> dict:
    """A model writing `script`, or `after_tool` once the last message is a tool's result."""
    command = [sys.executable, "-m", "tests.scripted_worker", "--script", script]
    if after_tool is not None:
        command += ["--after-tool", after_tool]
    return {"id": model_id, "path": str(path), "canary": {"prompt": "Hi", "max_tokens": 4},
            "worker_command": command, **extra}


@pytest.fixture(scope="module")
def agent_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "agent", agent=True)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, agent_model: Path, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("agent"), [
        _scripted("thinker", agent_model, THINK_SCRIPT),
        _scripted("caller", agent_model, CALL_SCRIPT),
        {"id": "plain", "path": str(tiny_model)},
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


def test_thinking_is_carried_apart_from_the_answer_streamed_and_final(sup: RunningSupervisor) -> None:
    chunks, result = _stream(sup, "thinker", messages=ASK, max_tokens=64)
    assert result.reasoning.strip() == "First, recall the facts."
    assert result.text.strip() == "The answer is 42."
    assert "".join(c.reasoning for c in chunks) == result.reasoning
    assert "".join(c.text for c in chunks) == result.text
    assert not any("think>" in c.text for c in chunks)


def test_a_client_turns_thinking_off_through_the_template(sup: RunningSupervisor) -> None:
    # The template closes the think block itself: what the model writes is all answer.
    result = sup.client.complete("thinker", messages=ASK, max_tokens=64,
                                 chat_template_kwargs={"enable_thinking": False})
    assert result.reasoning == ""
    assert "The answer is 42." in result.text


def test_tool_calls_come_back_parsed_and_never_as_text(sup: RunningSupervisor) -> None:
    chunks, result = _stream(sup, "caller", messages=ASK, tools=TOOLS, max_tokens=96)
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result.text.strip() == "Let me check."
    assert result.reasoning.strip() == "I should call the tool."
    streamed = [tc for c in chunks for tc in c.tool_calls]
    assert streamed == result.tool_calls
    text = "".join(c.text for c in chunks)
    assert "tool_call" not in text and "get_weather" not in text


def test_a_tool_conversation_goes_back_through_the_template(sup: RunningSupervisor) -> None:
    first = sup.client.complete("caller", messages=ASK, tools=TOOLS, max_tokens=96)
    history = ASK + [{"role": "assistant", "content": first.text, "tool_calls": first.tool_calls},
                     {"role": "tool", "tool_call_id": first.tool_calls[0]["id"], "content": "sunny, 21 C"}]
    second = sup.client.complete("caller", messages=history, tools=TOOLS, max_tokens=96)
    assert second.tool_calls and second.usage["prompt_tokens"] > first.usage["prompt_tokens"]
    # The earlier turns are the same tokens again: the prefix cache serves them.
    assert second.usage["cached_tokens"] > first.usage["prompt_tokens"] // 2


def test_without_tools_nothing_is_parsed(sup: RunningSupervisor) -> None:
    result = sup.client.complete("caller", messages=ASK, max_tokens=96)
    assert result.tool_calls == [] and result.finish_reason == "stop"


def test_tools_for_a_model_without_a_call_format_are_refused(sup: RunningSupervisor) -> None:
    with pytest.raises(E.BadRequest, match="tool-call format"):
        sup.client.complete("plain", messages=ASK, tools=TOOLS, max_tokens=4)
    assert sup.client.complete("plain", messages=ASK, max_tokens=4).usage["completion_tokens"] >= 1


def _check_logprobs(result, top: int) -> None:
    assert len(result.logprobs) == result.usage["completion_tokens"]
    for entry in result.logprobs:
        assert entry["logprob"] <= 0.0 and len(entry["top_logprobs"]) == top
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)
    # (the detokenizer drops the answer's leading space; a token keeps its own)
    assert "".join(e["token"] for e in result.logprobs).strip() == result.text.strip()


def test_logprobs_alone_and_in_the_batch(sup: RunningSupervisor) -> None:
    alone = sup.client.complete("plain", "Hello, world!", max_tokens=8, logprobs=True, top_logprobs=3)
    _check_logprobs(alone, 3)

    async def batch() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return await asyncio.gather(*(client.complete("plain", p, max_tokens=8, logprobs=True, top_logprobs=2)
                                          for p in ("One", "Two two", "Three three three")))

    for result in asyncio.run(batch()):
        _check_logprobs(result, 2)
    assert sup.client.complete("plain", "Hello", max_tokens=4).logprobs is None  # only when asked


@pytest.mark.parametrize("kwargs, match", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "function", "tool_name": "nope"}, "not one of the tools"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
])
def test_malformed_agent_fields_are_refused_before_the_wire(sup: RunningSupervisor, kwargs: dict, match: str) -> None:
    with pytest.raises(E.BadRequest, match=match):
        sup.client.complete("caller", messages=ASK, max_tokens=4, **kwargs)


# --- constrained decoding: random weights write valid JSON and real tool calls only because of it ---

# Bounded strings and numbers: a random model left free inside a string never closes it.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 30}},
          "required": ["city", "days"], "additionalProperties": False}
BOUNDED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}]


def _valid(value: dict) -> bool:
    return set(value) == {"city", "days"} and isinstance(value["city"], str) and isinstance(value["days"], int)


@pytest.fixture(scope="module")
def free(tmp_path_factory: pytest.TempPathFactory, agent_model: Path):
    """The agent snapshot without a script: what it writes is up to its random weights."""
    s = RunningSupervisor(tmp_path_factory.mktemp("free"), [
        {"id": "free", "path": str(agent_model), "canary": {"prompt": "Hi", "max_tokens": 4}}]).start()
    yield s
    s.cleanup()


def test_a_json_schema_is_enforced_alone_and_in_the_batch(free: RunningSupervisor) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    alone = free.client.complete("free", messages=ASK, max_tokens=200, response_format=fmt)
    assert alone.finish_reason == "stop" and _valid(json.loads(alone.text))

    async def batch() -> list:
        async with SupervisorClient(state_dir=free.state_dir) as client:
            return await asyncio.gather(*(
                client.complete("free", messages=[{"role": "user", "content": q}], max_tokens=200,
                                response_format=fmt, temperature=1.0, seed=i)
                for i, q in enumerate(["Plan a trip.", "Where to?", "Go!"])),
                client.complete("free", messages=ASK, max_tokens=8))  # an unconstrained neighbour

    *constrained, neighbour = asyncio.run(batch())
    assert all(r.finish_reason == "stop" and _valid(json.loads(r.text)) for r in constrained)
    assert neighbour.usage["completion_tokens"] >= 1


def test_a_named_tool_call_is_forced_in_the_models_own_format(free: RunningSupervisor) -> None:
    chunks, result = _stream(free, "free", messages=ASK, tools=BOUNDED_TOOLS, tool_choice="function",
                             tool_name="get_weather", max_tokens=200)
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert not any("tool_call" in c.text for c in chunks)


def test_a_forced_call_the_format_cannot_enforce_is_refused(free: RunningSupervisor) -> None:
    with pytest.raises(E.BadRequest, match="response_format and a forced tool call"):
        free.client.complete("free", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=8,
                             response_format={"type": "json_object"})
