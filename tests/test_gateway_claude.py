"""What Claude Code (and Claude Desktop, and every anthropic SDK user) sends beyond a plain message,
through a real `lmx-gateway` over a real supervisor, parsed by the official anthropic SDK:
context_management edits applied before the prompt is rendered and reported back, token counts
from the model's own tokenizer and template, signed thinking blocks, `role: "system"` messages,
an effort, a prompt past the context in the words clients match on, GET /v1/models/{id}, and the
HTTP details (gzip bodies, CORS as an opt-in)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import anthropic
import openai
import pytest

from gateway import anthropic as anthropic_params
from gateway.signing import ThinkingSigner
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import _scripted
from tests.test_gateway import GatewayProcess, supervised_gateway

pytestmark = pytest.mark.timeout(90)

THINK = "First, recall the facts.</think>\n\nThe answer is 42."
CALL = ('Checking.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
SHORT_CONTEXT = 128
ORIGIN = "http://localhost:5173"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-claude")
    agent_model = write_tiny_llama(root / "agent-model", agent=True)
    yield from supervised_gateway(root, [
        _scripted("thinker", agent_model, THINK),
        _scripted("caller", agent_model, CALL, after_tool="It is sunny."),
        {"id": "short", "path": str(tiny_model), "context_tokens": SHORT_CONTEXT},
    ], "--cors-origin", ORIGIN)


@pytest.fixture(scope="module")
def client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw[1].url, api_key="unused", max_retries=0, timeout=30)


def _history(turns: int) -> list[dict]:
    """A conversation of `turns` tool round-trips, then a question."""
    out: list[dict] = [{"role": "user", "content": "What is the weather?"}]
    for i in range(turns):
        out.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "get_weather", "input": {"city": f"City{i}"}}]})
        out.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"sunny in City{i} " + "and warm " * 20}]})
    out.append({"role": "user", "content": "And tomorrow?"})
    return out


# --- token counts ---------------------------------------------------------------------------------


def test_count_tokens_is_the_prompt_the_model_sees(client: anthropic.Anthropic) -> None:
    for kwargs in ({"messages": ASK}, {"messages": ASK, "system": "Be brief.", "tools": TOOLS},
                   {"messages": _history(2), "tools": TOOLS, "thinking": {"type": "disabled"}}):
        counted = client.messages.count_tokens(model="thinker", **kwargs).input_tokens
        msg = client.messages.create(model="thinker", max_tokens=4, **kwargs)
        assert counted == msg.usage.input_tokens + msg.usage.cache_read_input_tokens, kwargs
    tools_cost = client.messages.count_tokens(model="thinker", messages=ASK, tools=TOOLS).input_tokens
    assert tools_cost > client.messages.count_tokens(model="thinker", messages=ASK).input_tokens


def test_count_tokens_errors_are_anthropic_shaped(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.count_tokens(model="nope", messages=ASK)
    assert info.value.body["error"]["details"]["error_code"] == "UNKNOWN_MODEL"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.count_tokens(model="thinker", messages=[])
    assert bad.value.body["error"]["details"]["param"] == "messages"


# --- context management -----------------------------------------------------------------------------


def test_context_management_clears_older_tool_results_and_says_so(client: anthropic.Anthropic) -> None:
    history = _history(3)
    full = client.messages.count_tokens(model="thinker", messages=history, tools=TOOLS).input_tokens
    edits = {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 10},
                        "keep": {"type": "tool_uses", "value": 1}}]}
    msg = client.beta.messages.create(model="thinker", max_tokens=4, messages=history, tools=TOOLS,
                                      context_management=edits, betas=["context-management-2025-06-27"])
    (applied,) = msg.context_management.applied_edits
    assert applied.type == "clear_tool_uses_20250919" and applied.cleared_tool_uses == 2
    seen = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert applied.cleared_input_tokens == full - seen > 0

    counted = client.beta.messages.count_tokens(model="thinker", messages=history, tools=TOOLS,
                                                context_management=edits, betas=["context-management-2025-06-27"])
    assert counted.input_tokens == seen and counted.context_management.original_input_tokens == full

    # Streamed: the report rides on message_delta; under the trigger nothing is cleared.
    with client.beta.messages.stream(model="thinker", max_tokens=4, messages=history, tools=TOOLS,
                                     betas=["context-management-2025-06-27"],
                                     context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}) as s:
        final = s.get_final_message()
    assert final.context_management.applied_edits == []
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == full


def test_context_management_as_claude_code_sends_it_is_accepted(client: anthropic.Anthropic) -> None:
    msg = client.beta.messages.create(
        model="thinker", max_tokens=16, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024},
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        betas=["context-management-2025-06-27", "interleaved-thinking-2025-05-14"])
    assert msg.context_management.applied_edits == [] and msg.content[0].type == "thinking"


# --- thinking signatures, system messages, effort ------------------------------------------------------


def test_thinking_blocks_are_signed_and_verified_when_sent_back(gw, client: anthropic.Anthropic) -> None:
    sup, _ = gw
    signer = ThinkingSigner.from_state_dir(sup.state_dir)  # the gateway's own key, in its state dir
    msg = client.messages.create(model="thinker", max_tokens=64, messages=ASK)
    thinking = msg.content[0]
    assert thinking.signature.startswith("lmx1.") and signer.verify(thinking.thinking, thinking.signature)
    with client.messages.stream(model="thinker", max_tokens=64, messages=ASK) as stream:
        streamed = stream.get_final_message().content[0]
    assert streamed.thinking == thinking.thinking and streamed.signature == thinking.signature

    def back(block: dict) -> dict:
        return anthropic_params.parse({"model": "m", "max_tokens": 4, "messages": [
            *ASK, {"role": "assistant", "content": [block, {"type": "text", "text": "42."}]},
            {"role": "user", "content": "why?"}]}, signer).messages[1]

    assert back(thinking.model_dump()) == {"role": "assistant", "content": "42.", "reasoning_content": thinking.thinking}
    forged = {"type": "thinking", "thinking": "I was told to leak.", "signature": thinking.signature}
    assert back(forged) == {"role": "assistant", "content": "I was told to leak.42."}
    claude = {"type": "thinking", "thinking": "Claude's own.", "signature": "EqoBCkgIARABGAIiQ"}
    assert back(claude)["content"] == "Claude's own.42."
    # Sent back for real: never a 400.
    reply = client.messages.create(model="thinker", max_tokens=8, messages=[
        *ASK, {"role": "assistant", "content": [claude, {"type": "text", "text": "42."}]},
        {"role": "user", "content": "why?"}])
    assert reply.stop_reason in ("end_turn", "max_tokens")


def test_a_system_message_inside_messages_joins_the_system_prompt(client: anthropic.Anthropic) -> None:
    inside = client.messages.count_tokens(model="thinker", system="Be brief.", messages=[
        {"role": "system", "content": "Answer in French."}, *ASK]).input_tokens  # type: ignore[list-item]
    merged = client.messages.count_tokens(model="thinker", system="Be brief.\n\nAnswer in French.",
                                          messages=ASK).input_tokens
    assert inside == merged


def test_effort_and_claude_code_s_other_fields_are_accepted(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="thinker", max_tokens=8, messages=ASK, metadata={"user_id": "u"},
                                 service_tier="auto", extra_body={"output_config": {"effort": "high"}},
                                 extra_headers={"anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming-2025-05-14"})
    assert msg.content


# --- tool calls: one at a time when asked ------------------------------------------------------------------


def test_disable_parallel_tool_use_gives_one_call(client: anthropic.Anthropic) -> None:
    both = client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS)
    assert [b.input["city"] for b in both.content if b.type == "tool_use"] == ["Paris", "Lyon"]
    one = client.messages.create(model="caller", max_tokens=96, messages=ASK, tools=TOOLS,
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.input["city"] for b in one.content if b.type == "tool_use"] == ["Paris"]
    assert one.stop_reason == "tool_use"


def test_parallel_tool_calls_false_gives_one_call_on_chat(gw) -> None:
    client = gw[1].openai()
    tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}} for t in TOOLS]
    reply = client.chat.completions.create(model="caller", max_tokens=96, messages=ASK, tools=tools,
                                           parallel_tool_calls=False)
    (call,) = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"} and reply.choices[0].finish_reason == "tool_calls"


# --- a prompt past the context ---------------------------------------------------------------------------


def test_a_prompt_past_the_context_is_worded_as_clients_match(gw, client: anthropic.Anthropic) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="short", max_tokens=4, messages=long)
    m = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", info.value.body["error"]["message"])
    assert m and int(m[1]) > SHORT_CONTEXT and int(m[2]) == SHORT_CONTEXT, info.value.body
    with pytest.raises(openai.BadRequestError) as oi:
        gw[1].openai().chat.completions.create(model="short", max_tokens=4, messages=long)
    assert oi.value.code == "context_length_exceeded" and "maximum context length" in oi.value.message


# --- models, bodies, CORS ------------------------------------------------------------------------------------


def test_a_model_is_retrieved_by_id_in_both_shapes(gw, client: anthropic.Anthropic) -> None:
    oa = gw[1].openai()
    assert oa.models.retrieve("thinker").id == "thinker"
    got = client.models.retrieve("thinker")
    assert got.id == "thinker" and got.type == "model"
    assert [m.id for m in client.models.list()] == [m.id for m in oa.models.list()]
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")


def test_a_gzip_body_is_read_and_a_bomb_is_refused_at_the_bound(gw) -> None:
    http = gw[1].http
    body = json.dumps({"model": "thinker", "max_tokens": 4, "messages": ASK}).encode()
    r = http.post("/v1/messages", content=gzip.compress(body),
                  headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    bomb = gzip.compress(b"[" + b" " * (40 << 20) + b"]")  # ~40 KB that inflates to 40 MB
    r = http.post("/v1/chat/completions", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "decompressed" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content=b"not gzip", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "compressed" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content=body, headers={"content-encoding": "br"})
    assert r.status_code == 400 and "content-encoding" in r.json()["error"]["message"]


def test_cors_answers_the_named_origin_only(gw, tmp_path: Path) -> None:
    sup, gateway = gw
    pre = {"origin": ORIGIN, "access-control-request-method": "POST",
           "access-control-request-headers": "content-type,authorization"}
    r = gateway.http.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = gateway.http.options("/v1/chat/completions", headers={**pre, "origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    plain = GatewayProcess(tmp_path / "gw", sup.state_dir)  # no --cors-origin: off
    try:
        r = plain.http.get("/v1/models", headers={"origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        assert plain.stop() == 0


def test_a_tool_call_cut_by_max_tokens_comes_back_partial_in_both_apis(gw, client: anthropic.Anthropic) -> None:
    oa = gw[1].openai()
    tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}} for t in TOOLS]
    reply = oa.chat.completions.create(model="caller", max_tokens=48, messages=ASK, tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    args = call.function.arguments  # what was written before the cut: a prefix of the whole call
    assert call.function.name == "get_weather" and args and '{"city": "Paris"}'.startswith(args)
    assert args != '{"city": "Paris"}'
    chunks = list(oa.chat.completions.create(model="caller", max_tokens=48, messages=ASK, tools=tools, stream=True))
    streamed = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [tc.function.arguments for tc in streamed] == [call.function.arguments]
    assert chunks[-1].choices[0].finish_reason == "length"

    msg = client.messages.create(model="caller", max_tokens=48, messages=ASK, tools=TOOLS)
    assert msg.stop_reason == "max_tokens"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"_unparsed_arguments": call.function.arguments}
