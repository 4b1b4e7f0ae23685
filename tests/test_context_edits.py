"""Anthropic's context editing as the gateway applies it (gateway/context_edits.py), on the chat
messages the Messages API is read into. Pure logic: the token counter is the one fake here (the
JSON length of the messages); the end-to-end test through a real worker's count is in
tests/test_gateway_claude.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway import context_edits as ce
from protocol import errors as E

pytestmark = pytest.mark.timeout(10)


def _count(messages: list[dict]) -> "asyncio.Future[int]":
    async def run() -> int:
        return len(json.dumps(messages))
    return run()  # type: ignore[return-value]


def _conversation(uses: int) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": "tools"}, {"role": "user", "content": "go"}]
    for i in range(uses):
        name = "Read" if i % 2 == 0 else "Grep"
        out.append({"role": "assistant", "content": "", "reasoning_content": f"think {i}",
                    "tool_calls": [{"id": f"t{i}", "type": "function",
                                    "function": {"name": name, "arguments": {"path": f"/f{i}"}}}]})
        out.append({"role": "tool", "tool_call_id": f"t{i}", "content": f"result {i} " + "x" * 200})
    out.append({"role": "assistant", "content": "done", "reasoning_content": "last thought"})
    out.append({"role": "user", "content": "next"})
    return out


def _apply(edits: list[dict], messages: list[dict]) -> tuple[list[dict], list[dict]]:
    parsed = ce.parse({"edits": edits})
    assert parsed is not None
    return asyncio.run(ce.apply(parsed, messages, _count))


def test_older_tool_results_are_cleared_past_the_trigger_keeping_the_last_ones() -> None:
    messages = _conversation(5)
    edited, applied = _apply([{"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "input_tokens", "value": 100},
                               "keep": {"type": "tool_uses", "value": 2}}], messages)
    results = [m["content"] for m in edited if m["role"] == "tool"]
    assert results[:3] == [ce.PLACEHOLDER] * 3 and results[3].startswith("result 3") and results[4].startswith("result 4")
    (edit,) = applied
    assert edit["type"] == ce.CLEAR_TOOL_USES and edit["cleared_tool_uses"] == 3
    assert edit["cleared_input_tokens"] == len(json.dumps(messages)) - len(json.dumps(edited)) > 0
    assert messages[3]["content"].startswith("result 0"), "the client's history is never changed in place"
    # The calls themselves stay (clear_tool_inputs is off by default).
    assert edited[2]["tool_calls"][0]["function"]["arguments"] == {"path": "/f0"}


def test_under_the_trigger_or_under_clear_at_least_nothing_is_cleared() -> None:
    messages = _conversation(3)
    edited, applied = _apply([{"type": ce.CLEAR_TOOL_USES}], messages)  # default trigger: 100k tokens
    assert edited == messages and applied == []
    edited, applied = _apply([{"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "input_tokens", "value": 0},
                               "keep": {"type": "tool_uses", "value": 0},
                               "clear_at_least": {"type": "input_tokens", "value": 10**6}}], messages)
    assert edited == messages and applied == []
    edited, applied = _apply([{"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "tool_uses", "value": 3},
                               "keep": {"type": "tool_uses", "value": 0}}], messages)
    assert edited == messages and applied == [], "3 uses is not past a trigger of 3"


def test_excluded_tools_are_kept_and_tool_inputs_cleared_when_asked() -> None:
    messages = _conversation(4)
    edited, applied = _apply([{"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "input_tokens", "value": 0},
                               "keep": {"type": "tool_uses", "value": 0}, "exclude_tools": ["Grep"],
                               "clear_tool_inputs": True}], messages)
    results = {m["tool_call_id"]: m["content"] for m in edited if m["role"] == "tool"}
    assert results["t0"] == results["t2"] == ce.PLACEHOLDER
    assert results["t1"].startswith("result 1") and results["t3"].startswith("result 3")
    args = {c["id"]: c["function"]["arguments"] for m in edited for c in m.get("tool_calls") or ()}
    assert args == {"t0": {}, "t1": {"path": "/f1"}, "t2": {}, "t3": {"path": "/f3"}}
    assert applied[0]["cleared_tool_uses"] == 2


def test_older_thinking_is_cleared_keeping_the_last_turns_or_all() -> None:
    messages = _conversation(3)
    edited, applied = _apply([{"type": ce.CLEAR_THINKING, "keep": {"type": "thinking_turns", "value": 1}}], messages)
    kept = [m.get("reasoning_content") for m in edited if m["role"] == "assistant"]
    assert kept == [None, None, None, "last thought"]
    assert applied[0]["type"] == ce.CLEAR_THINKING and applied[0]["cleared_thinking_turns"] == 3
    assert applied[0]["cleared_input_tokens"] > 0
    edited, applied = _apply([{"type": ce.CLEAR_THINKING, "keep": "all"}], messages)
    assert edited == messages and applied == []


def test_edits_apply_in_order_and_an_unknown_strategy_is_advisory() -> None:
    messages = _conversation(2)
    edited, applied = _apply([{"type": ce.CLEAR_THINKING, "keep": {"type": "thinking_turns", "value": 0}},
                              {"type": "compact_20260101", "trigger": {"type": "input_tokens", "value": 1}},
                              {"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "input_tokens", "value": 0},
                               "keep": {"type": "tool_uses", "value": 1}}], messages)
    assert [e["type"] for e in applied] == [ce.CLEAR_THINKING, ce.CLEAR_TOOL_USES]
    assert not any(m.get("reasoning_content") for m in edited)
    assert sum(e["cleared_input_tokens"] for e in applied) == len(json.dumps(messages)) - len(json.dumps(edited))


@pytest.mark.parametrize("v, param", [
    ("clear", "context_management"),
    ({"edits": [{"type": ce.CLEAR_TOOL_USES, "trigger": {"type": "input_tokens", "value": -1}}]},
     "context_management.edits[0].trigger.value"),
    ({"edits": [{"type": ce.CLEAR_TOOL_USES, "exclude_tools": "Read"}]}, "context_management.edits[0].exclude_tools"),
    ({"edits": [{"type": ce.CLEAR_THINKING, "keep": {"type": "tool_uses", "value": 1}}]},
     "context_management.edits[0].keep"),
    ({"edits": [{"keep": 1}]}, "context_management.edits[0]"),
    ({"edits": [{"type": ce.CLEAR_THINKING}] * (ce.MAX_EDITS + 1)}, "context_management.edits"),
])
def test_a_malformed_edit_is_400_naming_it(v: object, param: str) -> None:
    with pytest.raises(E.BadRequest) as info:
        ce.parse(v)
    assert info.value.details["param"] == param
