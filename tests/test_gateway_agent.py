"""What agents send and expect, through a real `lmx-gateway` over a real supervisor, parsed by the
official openai SDK: reasoning_content apart from the answer, tool calls (never streamed as text),
multi-turn tool conversations, logprobs in chat and completions shapes, and the fields the gateway
cannot honour refused with a 400 naming them. The models write fixed scripts
(tests/scripted_worker.py) on a tiny snapshot with Qwen-style think and tool-call markers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from gateway import agent, fields, params
from protocol import errors as E
from tests.harness import REPO, RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import ASK, TOOLS, _scripted
from tests.test_gateway import GatewayProcess, supervised_gateway

pytestmark = pytest.mark.timeout(90)

THINK_SCRIPT = "First, recall the facts.</think>\n\nThe answer is 42."
CALL_SCRIPT = ('I should call the tool.</think>\n\nLet me check.<tool_call>\n'
               '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def agent_gateway(root: Path, tiny_model: Path) -> Iterator[tuple[RunningSupervisor, GatewayProcess]]:
    """A module fixture's body: one supervisor with "thinker", "caller" (scripted, with markers) and
    "plain" (no tool-call format), one gateway in front, both stopped (and checked) afterwards.
    Shared with tests/test_gateway_anthropic.py."""
    agent_model = write_tiny_llama(root / "agent-model", agent=True)
    yield from supervised_gateway(root, [
        _scripted("thinker", agent_model, THINK_SCRIPT),
        _scripted("caller", agent_model, CALL_SCRIPT),
        {"id": "plain", "path": str(tiny_model)},
    ])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    yield from agent_gateway(tmp_path_factory.mktemp("gateway-agent"), tiny_model)


@pytest.fixture(scope="module")
def client(gw) -> openai.OpenAI:
    return gw[1].openai()


# --- reasoning ----------------------------------------------------------------------------------


def test_reasoning_content_comes_apart_from_the_answer_plain_and_streamed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=64)
    msg = reply.choices[0].message
    assert msg.reasoning_content.strip() == "First, recall the facts."
    assert msg.content.strip() == "The answer is 42." and reply.choices[0].finish_reason == "stop"
    assert not msg.tool_calls

    chunks = list(client.chat.completions.create(model="thinker", messages=ASK, max_tokens=64, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert not any("think>" in (d.content or "") for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_template_kwargs_turn_thinking_off(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=64,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = reply.choices[0].message
    assert getattr(msg, "reasoning_content", None) is None  # the template closed the think block itself
    assert "The answer is 42." in msg.content


# --- tool calls -----------------------------------------------------------------------------------


def _check_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_calls_come_back_parsed_plain(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS, max_tokens=96)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    _check_call(call)
    assert choice.message.content.strip() == "Let me check."
    assert choice.message.reasoning_content.strip() == "I should call the tool."


def test_tool_calls_stream_whole_in_one_delta_and_never_as_content(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS, max_tokens=96,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    (call,) = calls
    assert call.index == 0
    _check_call(call)
    content = "".join(d.content or "" for d in deltas)
    assert content.strip() == "Let me check." and "tool_call" not in content and "get_weather" not in content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0

    # The SDK's own accumulator rebuilds the same message from the deltas.
    with client.chat.completions.stream(model="caller", messages=ASK, tools=TOOLS, max_tokens=96) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    _check_call(call)
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_tool_conversation_goes_back_through_the_template(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS, max_tokens=96)
    said = first.choices[0].message
    call = said.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model="caller", messages=history, tools=TOOLS, max_tokens=96)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the earlier turns: the prefix cache's
    # The SDK's parsed message sent back as it is (the usual agent loop) is accepted too.
    third = client.chat.completions.create(model="caller", messages=[*ASK, said, history[-1]], tools=TOOLS,
                                           max_tokens=96)
    assert third.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_pass(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=96)
        assert reply.choices[0].finish_reason in ("stop", "tool_calls")


def test_a_named_tool_choice_gives_that_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS, max_tokens=96,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_a_json_schema_response_parses(client: openai.OpenAI) -> None:
    # A boolean and an enum: a random model cannot run past max_tokens inside them.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "unit": {"enum": ["C", "F"]}},
              "required": ["ok", "unit"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="plain", messages=ASK, max_tokens=256,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}})
    answer = json.loads(reply.choices[0].message.content)
    assert isinstance(answer["ok"], bool) and answer["unit"] in ("C", "F")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tools_to_a_model_without_a_call_format_are_400(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, max_tokens=4, stream=stream)
    assert info.value.code == "BAD_REQUEST" and "tool-call format" in info.value.message


# --- logprobs -------------------------------------------------------------------------------------


def test_chat_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=ASK, max_tokens=8, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
    assert "".join(e.token for e in content).strip() == reply.choices[0].message.content.strip()

    chunks = list(client.chat.completions.create(model="plain", messages=ASK, max_tokens=8, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model="plain", messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None  # only when asked


def test_completions_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="plain", prompt="Hello, world!", max_tokens=8, logprobs=3)
    lp = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    streamed = list(client.completions.create(model="plain", prompt="Hello, world!", max_tokens=8, logprobs=3,
                                              stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


# --- no silent ignoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"messages": [{"role": "user", "content": "x", "weight": 2}]}, "messages[0].weight"),
    ({"stream_options": {"chunk_size": 2}}, "stream_options.chunk_size"),
])
def test_a_field_the_gateway_cannot_honour_is_400_naming_it(client: openai.OpenAI, extra: dict, param: str) -> None:
    messages = extra.get("messages", ASK)
    rest = {k: v for k, v in extra.items() if k != "messages"}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", max_tokens=2, messages=messages, extra_body=rest)
    assert info.value.code == "BAD_REQUEST" and info.value.param == param, info.value.message


def test_advisory_fields_and_harmless_defaults_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="plain", messages=ASK, max_tokens=2, user="u1", metadata={"k": "v"}, store=False,
        service_tier="auto", frequency_penalty=0, presence_penalty=0.0, logit_bias={}, parallel_tool_calls=True,
        n=1, top_p=1, extra_body={"top_k": 5, "prompt_cache_key": "k", "modalities": ["text"], "verbosity": "low",
                                  "reasoning_effort": "medium"})
    assert reply.usage.completion_tokens >= 1
    for extra, param in (({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"),
                         ({"tools": TOOLS}, "tools")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="plain", prompt="x", max_tokens=2, extra_body=extra)
        assert info.value.param == param


def test_docs_list_every_field() -> None:
    doc = (REPO / "docs" / "gateway.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", doc))
    every = {*fields.CHAT_HONOURED, *fields.COMPLETION_HONOURED, *fields.MESSAGES_HONOURED, *fields.OPENAI_ADVISORY,
             *fields.MESSAGES_ADVISORY, *fields.CHAT_REFUSED, *fields.MESSAGES_REFUSED}
    assert every - named == set()


# --- in process: the request's translation ------------------------------------------------------------


def test_params_carry_only_the_agent_fields_that_are_set() -> None:
    p = params.chat({"model": "m", "messages": ASK, "tools": TOOLS, "logprobs": True, "top_logprobs": 3,
                     "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                     "response_format": {"type": "text"}, "chat_template_kwargs": {"enable_thinking": False}})
    kw = p.client_kwargs()
    assert kw["tools"] == TOOLS and kw["tool_choice"] == "function" and kw["tool_name"] == "get_weather"
    assert kw["logprobs"] is True and kw["top_logprobs"] == 3 and "response_format" not in kw
    assert kw["chat_template_kwargs"] == {"enable_thinking": False} and "top_k" not in kw
    assert set(params.chat({"model": "m", "messages": ASK}).client_kwargs()) == {
        "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop"}


def test_messages_with_tool_calls_reach_the_template_as_it_reads_them() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    msgs = [{"role": "developer", "content": "be brief"},
            {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]}]
    out = [agent.chat_message(i, m) for i, m in enumerate(msgs)]
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}} and out[1]["content"] == ""
    assert out[2] == {"role": "tool", "content": "ok", "tool_call_id": "call_1"}
    with pytest.raises(E.BadRequest) as info:
        agent.chat_message(0, {"role": "tool", "content": "x"})
    assert info.value.details["param"] == "messages[0].tool_call_id"
    with pytest.raises(E.BadRequest):
        agent.chat_message(0, {"role": "user", "content": "x", "tool_calls": [call]})
