"""Anthropic's context editing (`context_management.edits`), applied by the gateway to the chat
messages before the prompt is rendered: clearing older tool results (clear_tool_uses_20250919)
and older thinking (clear_thinking_20251015) under the request's trigger / keep / exclude
settings. The client keeps its full history; what was cleared is reported in the response's
`context_management.applied_edits`, as Anthropic reports it. Token figures are the model's own
(the worker counts the rendered prompt: SupervisorClient.count_tokens), so a trigger fires at the
count the model would see. A strategy type this gateway does not know is advisory: logged once
per type, the rest still applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import structlog

from gateway.agent import bad

log = structlog.get_logger("lmx.gateway")

CLEAR_TOOL_USES = "clear_tool_uses_20250919"
CLEAR_THINKING = "clear_thinking_20251015"
MAX_EDITS = 8
# Anthropic's defaults for clear_tool_uses: trigger at 100k input tokens, keep the last 3 uses.
DEFAULT_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP_TOOL_USES = 3
PLACEHOLDER = "[This tool result was cleared to save context.]"

Count = Callable[[list[dict]], Awaitable[int]]
_warned: set[str] = set()


@dataclass(frozen=True)
class ClearToolUses:
    trigger_tokens: int | None    # fires past this many input tokens ...
    trigger_uses: int | None      # ... or past this many tool uses
    keep: int                     # the most recent tool uses kept
    clear_at_least: int           # not applied unless it clears this many input tokens
    exclude: frozenset[str]       # tool names never cleared
    clear_inputs: bool | frozenset[str]  # also clear the calls' arguments (all, or these tools')


@dataclass(frozen=True)
class ClearThinking:
    keep: int | None  # the most recent assistant turns whose thinking is kept; None: all


Edit = ClearToolUses | ClearThinking


def _count(where: str, v: Any, kinds: tuple[str, ...]) -> tuple[str, int]:
    if not isinstance(v, dict) or v.get("type") not in kinds:
        raise bad(where, f"expected {{type: {' | '.join(kinds)}, value}}")
    n = v.get("value")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise bad(f"{where}.value", "expected a non-negative integer")
    return v["type"], n


def _names(where: str, v: Any) -> frozenset[str]:
    if not isinstance(v, list) or len(v) > 128 or not all(isinstance(s, str) for s in v):
        raise bad(where, "expected a list of tool names")
    return frozenset(v)


def _tool_uses(where: str, e: dict) -> ClearToolUses:
    trigger_tokens: int | None = DEFAULT_TRIGGER_TOKENS
    trigger_uses = None
    if e.get("trigger") is not None:
        kind, n = _count(f"{where}.trigger", e["trigger"], ("input_tokens", "tool_uses"))
        trigger_tokens, trigger_uses = (n, None) if kind == "input_tokens" else (None, n)
    keep = DEFAULT_KEEP_TOOL_USES
    if e.get("keep") is not None:
        keep = _count(f"{where}.keep", e["keep"], ("tool_uses",))[1]
    least = 0 if e.get("clear_at_least") is None else _count(f"{where}.clear_at_least", e["clear_at_least"],
                                                              ("input_tokens",))[1]
    exclude = frozenset() if e.get("exclude_tools") is None else _names(f"{where}.exclude_tools", e["exclude_tools"])
    inputs = e.get("clear_tool_inputs", False)
    if inputs is None:
        inputs = False
    elif not isinstance(inputs, bool):
        inputs = _names(f"{where}.clear_tool_inputs", inputs)
    return ClearToolUses(trigger_tokens, trigger_uses, keep, least, exclude, inputs)


def _thinking(where: str, e: dict) -> ClearThinking:
    keep = e.get("keep")
    if keep is None:
        return ClearThinking(1)  # Anthropic's default: the last turn's thinking
    if keep == "all":
        return ClearThinking(None)
    return ClearThinking(_count(f"{where}.keep", keep, ("thinking_turns",))[1])


def parse(v: Any) -> tuple[Edit, ...] | None:
    """context_management: {edits: [...]}. None when absent."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("context_management", "expected {edits: [...]}")
    edits = v.get("edits") or []
    if not isinstance(edits, list) or len(edits) > MAX_EDITS:
        raise bad("context_management.edits", f"expected a list of at most {MAX_EDITS} edits")
    out: list[Edit] = []
    for i, e in enumerate(edits):
        where = f"context_management.edits[{i}]"
        kind = e.get("type") if isinstance(e, dict) else None
        if not isinstance(kind, str):
            raise bad(where, "expected an edit with a type")
        if kind == CLEAR_TOOL_USES:
            out.append(_tool_uses(where, e))
        elif kind == CLEAR_THINKING:
            out.append(_thinking(where, e))
        elif kind[:64] not in _warned:
            _warned.add(kind[:64])
            log.warning("gateway.context_edit_unknown", type=kind[:64],
                        detail="advisory: this strategy is not applied")
    return tuple(out)


def _clear_thinking(edit: ClearThinking, messages: list[dict]) -> tuple[list[dict], int]:
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("reasoning_content")]
    drop = turns if edit.keep == 0 else turns[:-edit.keep] if edit.keep else []
    if not drop:
        return messages, 0
    out = [dict(m) for m in messages]
    for i in drop:
        del out[i]["reasoning_content"]
    return out, len(drop)


def _call_names(messages: list[dict]) -> dict[str, str]:
    return {c.get("id", ""): (c.get("function") or {}).get("name", "")
            for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ()}


def _clear_tool_uses(edit: ClearToolUses, messages: list[dict]) -> tuple[list[dict], int]:
    names = _call_names(messages)
    results = [i for i, m in enumerate(messages) if m.get("role") == "tool"
               and names.get(m.get("tool_call_id", "")) not in edit.exclude and m.get("content") != PLACEHOLDER]
    if edit.trigger_uses is not None and len(results) <= edit.trigger_uses:
        return messages, 0
    drop = results[:-edit.keep] if edit.keep else results
    if not drop:
        return messages, 0
    out = [dict(m) for m in messages]
    cleared = {out[i].get("tool_call_id") for i in drop}
    for i in drop:
        out[i]["content"] = PLACEHOLDER
    if edit.clear_inputs:
        for m in out:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                m["tool_calls"] = [_cleared_call(c, edit.clear_inputs) if c.get("id") in cleared else c
                                   for c in m["tool_calls"]]
    return out, len(drop)


def _cleared_call(call: dict, which: bool | frozenset[str]) -> dict:
    fn = call.get("function") or {}
    if which is not True and fn.get("name") not in which:  # type: ignore[operator]
        return call
    return {**call, "function": {**fn, "arguments": {}}}


async def apply(edits: tuple[Edit, ...], messages: list[dict], count: Count) -> tuple[list[dict], list[dict]]:
    """The edited messages and the applied edits (Anthropic's response shape). Tokens are
    counted only when an edit needs them: a trigger, or the figure of what it cleared."""
    applied: list[dict] = []
    before: int | None = None
    for edit in edits:
        if isinstance(edit, ClearToolUses) and edit.trigger_tokens is not None:
            before = await count(messages) if before is None else before
            if before <= edit.trigger_tokens:
                continue
        edited, n = _clear_thinking(edit, messages) if isinstance(edit, ClearThinking) \
            else _clear_tool_uses(edit, messages)
        if not n:
            continue
        before = await count(messages) if before is None else before
        after = await count(edited)
        if isinstance(edit, ClearToolUses) and before - after < edit.clear_at_least:
            continue  # not worth a cleared prefix: Anthropic leaves it as it was
        if isinstance(edit, ClearThinking):
            applied.append({"type": CLEAR_THINKING, "cleared_thinking_turns": n, "cleared_input_tokens": before - after})
        else:
            applied.append({"type": CLEAR_TOOL_USES, "cleared_tool_uses": n, "cleared_input_tokens": before - after})
        messages, before = edited, after
    return messages, applied
