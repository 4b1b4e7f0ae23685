"""The Anthropic Messages API (`POST /v1/messages`) through a real `lmx-gateway` over a real
supervisor, parsed by the official anthropic SDK: text, thinking and tool_use blocks, plain and
streamed (the documented event sequence), tool_use / tool_result history through the template,
and errors in Anthropic's shape with the LMX code's HTTP status."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anthropic
import pytest

from gateway import anthropic as anthropic_params
from protocol import errors as E
from tests.test_gateway import GatewayProcess
from tests.test_gateway_agent import agent_gateway

pytestmark = pytest.mark.timeout(90)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    yield from agent_gateway(tmp_path_factory.mktemp("gateway-anthropic"), tiny_model)


def _client(gateway: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(gw) -> anthropic.Anthropic:
    return _client(gw[1])


def _types(events: list) -> list[str]:
    return [e.type for e in events]


# --- answers ------------------------------------------------------------------------------------


def test_a_message_has_thinking_and_text_blocks(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="thinker", max_tokens=64, messages=ASK, system="Be brief.",
                                 metadata={"user_id": "u1"})
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == "thinker"
    thinking, text = msg.content
    assert thinking.type == "thinking" and thinking.thinking.strip() == "First, recall the facts."
    assert text.type == "text" and text.text.strip() == "The answer is 42."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10 and msg.usage.output_tokens > 0


def test_the_stream_is_the_documented_event_sequence(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model="thinker", max_tokens=64, messages=ASK, stream=True))
    kinds = _types(events)
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.content == [] and events[0].message.stop_reason is None
    blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert blocks == ["thinking", "text"]
    assert kinds.count("content_block_stop") == 2
    thinking = "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                       and e.delta.type == "thinking_delta")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert thinking.strip() == "First, recall the facts." and text.strip() == "The answer is 42."
    delta = events[-2]
    assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens > 0 and delta.usage.input_tokens > 0

    # The SDK's accumulator builds the same message as the plain call.
    with client.messages.stream(model="thinker", max_tokens=64, messages=ASK) as stream:
        final = stream.get_final_message()
    plain = client.messages.create(model="thinker", max_tokens=64, messages=ASK)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_thinking_disabled_goes_to_the_template(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="thinker", max_tokens=64, messages=ASK, thinking={"type": "disabled"})
    assert [b.type for b in msg.content] == ["text"] and "The answer is 42." in msg.content[0].text
    on = client.messages.create(model="thinker", max_tokens=64, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 1024})
    assert on.content[0].type == "thinking"


def test_stop_sequences_end_the_text_before_them(client: anthropic.Anthropic) -> None:
    # (this SDK has no sampling arguments any more; the API and the gateway still take them)
    msg = client.messages.create(model="thinker", max_tokens=64, messages=ASK, stop_sequences=["42"],
                                 extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40})
    assert msg.content[-1].text.strip() == "The answer is"
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "42"
    with client.messages.stream(model="thinker", max_tokens=64, messages=ASK, stop_sequences=["42"]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "42"


# --- tools ----------------------------------------------------------------------------------------


def _check_tool_use(msg: Any) -> Any:
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    use = msg.content[-1]
    assert use.id.startswith("toolu_") and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert msg.content[1].text.strip() == "Let me check."
    return use


def test_tool_use_blocks_plain_and_streamed(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS)
    _check_tool_use(msg)
    events = list(client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS, stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["thinking", "text", "tool_use"] and starts[-1].input == {}
    json_deltas = [e.delta for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(json_deltas) == 1  # the call arrives whole
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert "tool_call" not in text and "get_weather" not in text
    assert events[-2].delta.stop_reason == "tool_use"
    with client.messages.stream(model="caller", max_tokens=96, messages=ASK, tools=TOOLS) as stream:
        _check_tool_use(stream.get_final_message())


def test_a_tool_result_conversation_goes_back_through_the_template(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS)
    use = _check_tool_use(first)
    history = ASK + [
        {"role": "assistant", "content": first.content},  # the SDK's blocks, thinking included, as agents send
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "And tomorrow?"}]},
    ]
    second = client.messages.create(model="caller", max_tokens=96, messages=history, tools=TOOLS,
                                    tool_choice={"type": "auto"})
    total = lambda m: m.usage.input_tokens + m.usage.cache_read_input_tokens  # noqa: E731
    assert total(second) > total(first)
    assert second.usage.cache_read_input_tokens > 0  # the earlier turns: the prefix cache's


def test_tool_choice_tool_forces_that_call(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS,
                                 tool_choice={"type": "tool", "name": "get_weather"})
    assert msg.stop_reason == "tool_use" and msg.content[-1].name == "get_weather"


def test_output_config_format_gives_json_that_validates(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    msg = client.messages.create(model="plain", max_tokens=256, messages=ASK,
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(msg.content[0].text)["ok"], bool)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_unknown_model_is_404_not_found_error(client: anthropic.Anthropic, stream: bool) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=4, messages=ASK, stream=stream)
    err = info.value
    assert err.status_code == 404 and err.type == "not_found_error" and err.error_code == "UNKNOWN_MODEL"
    assert err.body["type"] == "error" and err.response.headers["x-should-retry"] == "false"
    assert err.request_id and err.body["request_id"] == err.request_id


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tools_to_a_model_without_a_call_format_are_400(client: anthropic.Anthropic, stream: bool) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="plain", max_tokens=4, messages=ASK, tools=TOOLS, stream=stream)
    assert info.value.type == "invalid_request_error" and "tool-call format" in info.value.api_message


@pytest.mark.parametrize("body, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}}, "tool_choice.disable_parallel_tool_use"),
    ({"thinking": {"type": "between_tools"}}, "thinking"),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "turns", "value": 1}}]}},
     "context_management.edits[0].keep"),
    ({"speed": "fast"}, "speed"),
    ({"temperature": 1.5}, "temperature"),
    ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
])
def test_a_field_the_gateway_cannot_honour_is_400_naming_it(gw, body: dict, param: str) -> None:
    _, gateway = gw
    request = {"model": "plain", "max_tokens": 4, "messages": ASK, **body}
    r = gateway.http.post("/v1/messages", json=request)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["details"]["param"] == param and err["error"]["details"]["error_code"] == "BAD_REQUEST"


def test_a_worker_killed_mid_stream_ends_with_an_error_event(gw) -> None:
    sup, gateway = gw
    client = _client(gateway)
    pid = sup.model("plain")["worker_pid"]
    seen = 0
    with pytest.raises(anthropic.APIStatusError) as info:
        for _ in client.messages.create(model="plain", max_tokens=1500, messages=ASK, stream=True):
            seen += 1
            if seen == 3:
                os.kill(pid, signal.SIGKILL)
    err = info.value
    # The status was already 200: the SDK raises from the `error` event, with its body.
    assert err.status_code == 200 and err.type == "api_error" and err.error_code == "WORKER_CRASHED"
    sup.wait_model("plain", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "restarted")


# --- in process: the request's translation ------------------------------------------------------------


def test_blocks_become_the_messages_templates_read() -> None:
    p = anthropic_params.parse({
        "model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief.", "cache_control": {}}],
        "tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}, "thinking": {"type": "disabled"},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": ""}, {"type": "text", "text": "Let me see."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": True},
                {"type": "text", "text": "thanks"}]},
        ]})
    assert p.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me see.", "reasoning_content": "hmm",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
        {"role": "user", "content": "thanks"},
    ]
    kw = p.client_kwargs()
    assert kw["tool_choice"] == "function" and kw["tool_name"] == "get_weather"
    assert kw["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]
    assert kw["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(E.BadRequest) as info:
        anthropic_params.parse({"model": "m", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]})
    assert info.value.details["param"] == "messages"
