"""The OpenAI Responses API (`/v1/responses`) through a real `lmx-gateway` over a real supervisor,
parsed by the official openai SDK: output items (reasoning, message, function_call), the streamed
event sequence rebuilt by the SDK's own accumulator, a tool call round trip, stored responses
chained with previous_response_id (also across a gateway restart), retrieve and delete,
text.format through constrained decoding, max_output_tokens -> incomplete, and errors in OpenAI's
shape before and after the stream opened. The models write fixed scripts (tests/scripted_worker.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
from pathlib import Path
from typing import Any, Literal

import openai
import pydantic
import pytest

from gateway import fields, responses
from gateway.responses_store import ChainBroken, ResponseStore
from protocol import errors as E
from tests.harness import REPO
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import _scripted
from tests.test_gateway import GatewayProcess, supervised_gateway
from tests.test_gateway_agent import CALL_SCRIPT, THINK_SCRIPT

pytestmark = pytest.mark.timeout(120)

ASK = "What is the weather in Paris?"
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
FINAL = "It is sunny in Paris, 21 C."
AFTER_TOOL = f"The tool answered.</think>\n\n{FINAL}"
CALL = '{{"name": "get_weather", "arguments": {{"city": "{}"}}}}'
TWO_CALLS = f"Two cities.</think>\n\n<tool_call>\n{CALL.format('Paris')}\n</tool_call>\n<tool_call>\n" \
            f"{CALL.format('Rome')}\n</tool_call>"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-responses")
    agent_model = write_tiny_llama(root / "agent-model", agent=True)
    yield from supervised_gateway(root, [
        _scripted("thinker", agent_model, THINK_SCRIPT),
        _scripted("agent", agent_model, CALL_SCRIPT, after_tool=AFTER_TOOL),
        _scripted("twice", agent_model, TWO_CALLS),
        {"id": "plain", "path": str(tiny_model)},
    ])


@pytest.fixture(scope="module")
def client(gw) -> openai.OpenAI:
    return gw[1].openai()


def _kinds(response: Any) -> list[str]:
    return [item.type for item in response.output]


def _reasoning(response: Any) -> str:
    return "".join(part.text for item in response.output if item.type == "reasoning" for part in item.content or ())


# --- answers ----------------------------------------------------------------------------------------


def test_a_response_has_reasoning_and_message_items_and_usage(client: openai.OpenAI) -> None:
    r = client.responses.create(model="thinker", input=ASK, max_output_tokens=64, instructions="Be brief.")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert _kinds(r) == ["reasoning", "message"]
    assert _reasoning(r).strip() == "First, recall the facts."
    assert r.output_text.strip() == "The answer is 42." and "think>" not in r.output_text
    assert r.output[1].role == "assistant" and r.output[1].status == "completed"
    assert r.instructions == "Be brief." and r.max_output_tokens == 64 and r.incomplete_details is None
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0


def test_the_streamed_events_rebuild_the_same_response(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="thinker", input=ASK, max_output_tokens=64)
    with client.responses.stream(model="thinker", input=ASK, max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == _reasoning(whole)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.reasoning_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds, kind
    assert _kinds(final) == _kinds(whole) and final.output_text == whole.output_text
    assert _reasoning(final) == _reasoning(whole) and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_reasoning_effort_none_turns_thinking_off(client: openai.OpenAI) -> None:
    r = client.responses.create(model="thinker", input=ASK, max_output_tokens=64, reasoning={"effort": "none"})
    assert _kinds(r) == ["message"] and "The answer is 42." in r.output_text  # the template closed the block
    assert r.reasoning.effort == "none"


def _call(response: Any) -> Any:
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"
    return call


def test_a_tool_call_round_trip_with_the_whole_history_sent_back(client: openai.OpenAI) -> None:
    first = client.responses.create(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96, store=False)
    assert _kinds(first) == ["reasoning", "message", "function_call"]
    call = _call(first)
    assert first.output_text.strip() == "Let me check." and "tool_call" not in first.output_text
    # The usual loop with store=False: the output items go back as input, then the tool's result.
    history = [{"role": "user", "content": ASK}, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    second = client.responses.create(model="agent", input=history, tools=TOOLS, max_output_tokens=96, store=False)
    assert second.output_text.strip() == FINAL and _kinds(second) == ["reasoning", "message"]
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the earlier turns: the prefix cache's


def test_a_streamed_tool_call_comes_whole_in_its_arguments_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96) as stream:
        events = list(stream)
        final = stream.get_final_response()
    args = [e for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(e.delta for e in args) == done.arguments and json.loads(done.arguments) == {"city": "Paris"}
    _call(final)
    assert not any("get_weather" in getattr(e, "delta", "") for e in events if e.type.endswith("output_text.delta"))


def test_codex_tool_shapes_web_search_is_not_offered_and_namespaces_come_back(gw) -> None:
    # What Codex sends by default: function tools, a namespace of function tools, web_search.
    inner = {**TOOLS[0], "strict": False}
    body = {"model": "agent", "input": ASK, "max_output_tokens": 96, "store": False, "tools": [
        {"type": "web_search", "external_web_access": False},
        {"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [inner]}]}
    r = gw[1].http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    (call,) = [i for i in r.json()["output"] if i["type"] == "function_call"]
    assert call["name"] == "get_weather" and call["namespace"] == "weather"
    req = responses.parse(body)
    assert [t["function"]["name"] for t in req.agent["tools"]] == ["get_weather"]  # no search offered
    bad = gw[1].http.post("/v1/responses", json={**body, "tool_choice": {"type": "web_search"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_a_named_tool_choice_gives_that_call(client: openai.OpenAI) -> None:
    r = client.responses.create(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"


# --- stored responses -------------------------------------------------------------------------------


def test_previous_response_id_continues_a_stored_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96)
    call = _call(first)
    assert first.store is True
    second = client.responses.create(model="agent", previous_response_id=first.id, tools=TOOLS, max_output_tokens=96,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny, 21 C"}])
    assert second.output_text.strip() == FINAL and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0

    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text and got.usage == second.usage
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]

    client.responses.delete(second.id)
    for fn in (lambda: client.responses.retrieve(second.id), lambda: client.responses.delete(second.id)):
        with pytest.raises(openai.NotFoundError):
            fn()
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="agent", previous_response_id=second.id, input="and tomorrow?")
    assert info.value.param == "previous_response_id" and info.value.code == "previous_response_not_found"


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    r = client.responses.create(model="thinker", input=ASK, max_output_tokens=64, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_a_stored_conversation_survives_a_gateway_restart(gw, tmp_path: Path) -> None:
    sup, _ = gw
    before = GatewayProcess(tmp_path / "gw-before", sup.state_dir)
    try:
        first = before.openai().responses.create(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96)
    finally:
        assert before.stop() == 0
    call = _call(first)
    after = GatewayProcess(tmp_path / "gw-after", sup.state_dir)
    try:
        client = after.openai()
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = client.responses.create(model="agent", previous_response_id=first.id, tools=TOOLS,
                                         max_output_tokens=96,
                                         input=[{"type": "function_call_output", "call_id": call.call_id,
                                                 "output": "sunny"}])
        assert second.output_text.strip() == FINAL
    finally:
        assert after.stop() == 0
    path = sup.state_dir / "gateway" / "responses.sqlite"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# --- formats, limits, errors ------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "unit": {"enum": ["C", "F"]}},
          "required": ["ok", "unit"], "additionalProperties": False}


class Reading(pydantic.BaseModel):
    ok: bool
    unit: Literal["C", "F"]


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    # A boolean and an enum: a random model cannot run past max_output_tokens inside them.
    r = client.responses.create(model="plain", input=ASK, max_output_tokens=256,
                                text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA, "strict": True}})
    answer = json.loads(r.output_text)
    assert isinstance(answer["ok"], bool) and answer["unit"] in ("C", "F")
    assert r.text.format.type == "json_schema"


def test_text_format_through_the_sdks_parse(client: openai.OpenAI) -> None:
    r = client.responses.parse(model="plain", input=ASK, max_output_tokens=256, text_format=Reading)
    assert isinstance(r.output_parsed, Reading) and r.output_parsed.unit in ("C", "F")


def test_max_output_tokens_cuts_to_incomplete_plain_and_streamed(client: openai.OpenAI) -> None:
    r = client.responses.create(model="plain", input=ASK, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"
    events = list(client.responses.create(model="plain", input=ASK, max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_call_cut_by_max_output_tokens_comes_back_partial_and_incomplete(client: openai.OpenAI,
                                                                         stream: bool) -> None:
    whole = client.responses.create(model="agent", input=ASK, tools=TOOLS, max_output_tokens=96, store=False)
    cut = whole.usage.output_tokens - 5  # inside the call's arguments (the EOS that ended `whole` counts too)
    body: dict[str, Any] = {"model": "agent", "input": ASK, "tools": TOOLS, "max_output_tokens": cut, "store": False}
    if stream:
        with client.responses.stream(**body) as events:
            seen = list(events)
        kinds = [e.type for e in seen]
        assert kinds[-1] == "response.incomplete" and "response.function_call_arguments.done" in kinds
        r = seen[-1].response
    else:
        r = client.responses.create(**body)
    assert r is not None and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    call = r.output[-1]
    assert call.type == "function_call" and call.status == "incomplete" and call.name == "get_weather"
    assert call.arguments and '{"city": "Paris"}'.startswith(call.arguments) and call.arguments != '{"city": "Paris"}'


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]", "file_search"),
    ({"tools": [{"type": "function", "name": "f", "colour": "red"}]}, "tools[0].colour", "unknown"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]",
     "input_image"),
    ({"input": [{"type": "computer_call", "id": "x"}]}, "input[0].type", "computer_call"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", "call_id"),
    ({"temperature": 5}, "temperature", "[0.0, 2.0]"),
    ({"max_output_tokens": 0}, "max_output_tokens", "integer"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "json_schema"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "high"),
    ({"background": True}, "background", "background"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unknown field"),
])
def test_bad_input_is_400_in_openais_shape_naming_the_param(gw, extra: dict, param: str, words: str) -> None:
    r = gw[1].http.post("/v1/responses", json={"model": "plain", "input": ASK, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "BAD_REQUEST" and err["type"] == "invalid_request_error"
    assert words in err["message"], err["message"]


def test_the_fields_clients_send_by_default_are_accepted(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="thinker", input=[{"role": "developer", "content": "Be brief."},
                                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]}],
        max_output_tokens=64, store=False, metadata={"k": "v"}, user="u1", truncation="disabled",
        include=["reasoning.encrypted_content"], service_tier="auto", prompt_cache_key="k", safety_identifier="s",
        parallel_tool_calls=True, top_p=1, temperature=0, text={"format": {"type": "text"}, "verbosity": "medium"},
        reasoning={"effort": "medium", "summary": "auto"}, extra_body={"top_logprobs": 0, "background": False})
    assert r.status == "completed" and r.metadata == {"k": "v"} and r.user == "u1"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_unknown_model_is_404(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="nope", input=ASK, max_output_tokens=4, stream=stream)
    assert info.value.code == "UNKNOWN_MODEL"


def test_a_worker_killed_mid_stream_ends_with_an_error_event(gw) -> None:
    sup, gateway = gw
    pid = sup.model("plain")["worker_pid"]
    seen: list[Any] = []
    for event in gateway.openai().responses.create(model="plain", input=ASK, max_output_tokens=1500, stream=True):
        seen.append(event)
        if len(seen) == 5:
            os.kill(pid, signal.SIGKILL)
    kinds = [e.type for e in seen]
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
    assert seen[-2].code == "WORKER_CRASHED" and seen[-1].response.status == "failed"
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    sup.wait_model("plain", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "restarted")


# --- what depends on the wire's newest requests: last -----------------------------------------------


def test_input_tokens_counts_the_prompt_the_create_would_render(client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "agent", "input": ASK, "tools": TOOLS, "instructions": "Be brief."}
    counted = client.responses.input_tokens.count(**body)
    made = client.responses.create(**body, max_output_tokens=96, store=False)
    assert counted.object == "response.input_tokens" and counted.input_tokens == made.usage.input_tokens


def _cities(response: Any) -> list[str]:
    return [json.loads(i.arguments)["city"] for i in response.output if i.type == "function_call"]


def test_parallel_tool_calls_false_gives_at_most_one_call(client: openai.OpenAI) -> None:
    both = client.responses.create(model="twice", input=ASK, tools=TOOLS, max_output_tokens=200)
    assert _cities(both) == ["Paris", "Rome"] and both.parallel_tool_calls is True
    one = client.responses.create(model="twice", input=ASK, tools=TOOLS, max_output_tokens=200,
                                  parallel_tool_calls=False)
    assert _cities(one) == ["Paris"] and one.parallel_tool_calls is False and one.status == "completed"


# --- in process -------------------------------------------------------------------------------------


def test_docs_list_every_responses_field() -> None:
    doc = (REPO / "docs" / "gateway.md").read_text()
    section = doc[doc.index("#### `POST /v1/responses`"):]
    named = set(re.findall(r"`([a-z_]+)`", section))
    every = {*fields.RESPONSES_HONOURED, *fields.RESPONSES_ADVISORY, *fields.RESPONSES_REFUSED,
             *fields.INPUT_TOKENS_HONOURED, *fields.INPUT_TOKENS_ADVISORY}
    assert every - named == set()


def test_items_become_the_messages_templates_read() -> None:
    req = responses.parse({"model": "m", "instructions": "Be brief.", "tools": TOOLS, "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "sunny"}]},
        {"role": "developer", "content": "answer now"}]})
    assert req.params([]).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me see.", "reasoning_content": "hmm",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "system", "content": "answer now"}]
    kw = req.params([]).client_kwargs()
    assert kw["tools"] == [{"type": "function", "function": {"name": "get_weather", **{
        k: TOOLS[0][k] for k in ("description", "parameters")}}}]
    with pytest.raises(E.BadRequest):
        responses.parse({"model": "m", "input": []}).params([])


def test_the_store_is_bounded_by_count_and_age_and_kept_per_owner(tmp_path: Path) -> None:
    import asyncio

    store = ResponseStore(tmp_path / "gateway" / "responses.sqlite", max_count=3, max_age_s=3600)

    async def fill() -> None:
        for i in range(5):
            response = {"id": f"resp_{i}", "output": [{"type": "message", "role": "assistant", "content": str(i)}],
                        "previous_response_id": f"resp_{i - 1}" if i else None}
            await store.put(response, [{"role": "user", "content": str(i)}], "key-a")

    asyncio.run(fill())
    assert store.count() == 3
    assert store.get("resp_1", "key-a") is None and store.get("resp_4", "key-a") is not None
    assert store.get("resp_4", "key-b") is None and store.get("resp_4", None) is None  # another key's
    with pytest.raises(ChainBroken):  # its first two ancestors are gone
        store.conversation("resp_4", "key-a")
    for rid, prev in (("resp_a", None), ("resp_b", "resp_a")):
        asyncio.run(store.put({"id": rid, "previous_response_id": prev, "output": [{"content": f"{rid} out"}]},
                              [{"content": f"{rid} in"}], "key-a"))
    assert [i["content"] for i in store.conversation("resp_b", "key-a") or ()] == [
        "resp_a in", "resp_a out", "resp_b in", "resp_b out"]
    assert store.conversation("resp_b", "key-b") is None
    assert asyncio.run(store.delete("resp_4", "key-b")) is False and asyncio.run(store.delete("resp_4", "key-a"))
    store.max_age_s = -60.0  # every row is now past the age bound: reads skip it before any prune
    assert store.get("resp_a", "key-a") is None
    store.close()
    path = tmp_path / "gateway" / "responses.sqlite"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sqlite3.connect(path).execute("SELECT count(*) FROM responses").fetchone() == (2,)
