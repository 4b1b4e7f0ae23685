"""What agents send in OpenAI's shape, validated into what SupervisorClient.generate takes: chat
messages with tool calls and tool results, tools, tool_choice, response_format, logprobs,
chat_template_kwargs, top_k. The Anthropic side (gateway/anthropic.py) converts its blocks into
these same shapes, so both end at one set of checks. Every refusal names the field."""

from __future__ import annotations

import json
from typing import Any

from protocol import errors as E
from protocol import limits

ROLES = ("system", "developer", "user", "assistant", "tool")
# Keys a message may carry beside role and content. A null in any other key is "not set" (clients
# that round-trip a parsed response send `refusal: null`, `audio: null`); anything else is refused.
_MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content")


def bad(param: str, problem: str) -> E.LmxError:
    return E.BadRequest(f"{param}: {problem}", param=param)


def text_content(param: str, content: Any) -> str:
    """A string, null, or OpenAI's array form with only text parts (a text model reads no images)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(param, "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(param, "expected a string or a list of text parts")


def _arguments(param: str, args: Any) -> Any:
    # Templates differ: some write `arguments | tojson`, some iterate `arguments.items()`. An object
    # serves both, so a JSON string is parsed (as vLLM does); a string that is not JSON stays a string.
    if isinstance(args, dict):
        return args
    if not isinstance(args, str):
        raise bad(param, "expected a JSON string or an object")
    try:
        parsed = json.loads(args)
    except ValueError:
        return args
    return parsed if isinstance(parsed, dict) else args


def tool_calls(param: str, calls: Any) -> list[dict]:
    """An assistant message's tool_calls, as the template reads them."""
    if not isinstance(calls, list):
        raise bad(param, "expected a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function" \
                or not isinstance(fn.get("name"), str) or not isinstance(call.get("id", ""), str):
            raise bad(where, "expected {id, type: \"function\", function: {name, arguments}}")
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": _arguments(f"{where}.function.arguments",
                                                                             fn.get("arguments", "{}"))}})
    return out


def chat_message(i: int, m: Any) -> dict:
    """One OpenAI chat message, as the chat template reads it."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise bad(where, f"expected an object with a role among {', '.join(ROLES)}")
    for key, value in m.items():
        if key not in ("role", "content", *_MESSAGE_KEYS) and value is not None:
            raise bad(f"{where}.{str(key)[:64]}", "unknown message field")
    role = m["role"]
    # Chat templates know `system`; `developer` is OpenAI's newer name for the same instructions.
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": text_content(f"{where}.content", m.get("content"))}
    for key in ("name", "reasoning_content", "tool_call_id"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise bad(f"{where}.{key}", "expected a string")
            out[key] = m[key]
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise bad(f"{where}.tool_calls", "only assistant messages carry tool calls")
        out["tool_calls"] = tool_calls(f"{where}.tool_calls", m["tool_calls"])
    if role == "tool" and "tool_call_id" not in out:
        raise bad(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
    return out


def message_chars(m: dict) -> int:
    """Characters a message brings to the prompt, for protocol.limits.MAX_PROMPT_CHARS."""
    n = sum(len(v) for v in m.values() if isinstance(v, str))
    for call in m.get("tool_calls", ()):
        args = call["function"]["arguments"]
        n += len(call["function"]["name"]) + len(args if isinstance(args, str) else json.dumps(args))
    return n


def tools(body: dict) -> list[dict] | None:
    v = body.get("tools")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > limits.MAX_TOOLS:
        raise bad("tools", f"expected a list of at most {limits.MAX_TOOLS} function tools")
    for j, tool in enumerate(v):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str) \
                or not fn["name"] or not isinstance(fn.get("parameters", {}), dict):
            raise bad(f"tools[{j}]", "expected {type: \"function\", function: {name, description?, parameters?}} "
                                     "(only function tools are supported)")
    return v or None


def _tool_names(tool_list: list[dict] | None) -> set[str]:
    return {t["function"]["name"] for t in tool_list or ()}


def tool_choice(value: Any, tool_list: list[dict] | None, param: str = "tool_choice") -> dict[str, Any]:
    """OpenAI's tool_choice as the client's (tool_choice, tool_name); {} when absent."""
    if value is None:
        return {}
    if value in ("auto", "none"):
        return {"tool_choice": value}
    if value == "required":
        if not tool_list:
            raise bad(param, "\"required\" needs tools")
        return {"tool_choice": "required"}
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict) or value.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise bad(param, "expected \"auto\", \"none\", \"required\" or {type: \"function\", function: {name}}")
    if fn["name"] not in _tool_names(tool_list):
        raise bad(param, f"names {fn['name'][:64]!r}, which is not one of the tools")
    return {"tool_choice": "function", "tool_name": fn["name"]}


def response_format(body: dict) -> dict | None:
    v = body.get("response_format")
    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None  # free text: what every request gets without it
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format.json_schema", "expected {name, schema, strict?}")
        return {"type": "json_schema", "json_schema": spec}
    raise bad("response_format", "expected type text, json_object or json_schema")


def chat_template_kwargs(body: dict) -> dict | None:
    v = body.get("chat_template_kwargs")
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise bad("chat_template_kwargs", "expected an object")
    return v or None


# A reasoning effort (chat's reasoning_effort, Messages' output_config.effort, Responses'
# reasoning.effort) as the chat template's own switches: every level travels as the template
# variable `reasoning_effort` (gpt-oss's template reads low/medium/high), and "none"/"minimal" also
# turn thinking off (`enable_thinking`, which Qwen3-style templates read). A template that reads
# neither renders as before: there the effort is advisory.
_EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
            "xhigh": "high", "max": "high"}


def effort(where: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if v not in _EFFORTS:
        raise bad(where, f"expected one of {', '.join(_EFFORTS)}")
    out: dict[str, Any] = {"reasoning_effort": _EFFORTS[v]}
    if v in ("none", "minimal"):
        out["enable_thinking"] = False
    return out


def template_kwargs(switches: dict[str, Any], given: dict | None) -> dict | None:
    """The template variables a request sets: its switches (effort, thinking), under what the
    client named itself in chat_template_kwargs."""
    merged = {**switches, **(given or {})}
    return merged or None


def top_k(body: dict) -> int:
    v = body.get("top_k")
    if v is None or v == -1:  # -1: vLLM's and SGLang's "off"
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limits.MAX_TOP_K:
        raise bad("top_k", f"expected an integer in [0, {limits.MAX_TOP_K}] (0 or -1: off)")
    return v


def chat_logprobs(body: dict) -> tuple[bool, int]:
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise bad("logprobs", "expected a boolean")
    if top is None:
        return bool(on), 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= limits.MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"expected an integer in [0, {limits.MAX_TOP_LOGPROBS}]")
    if top and not on:
        raise bad("top_logprobs", "needs logprobs: true")
    return bool(on), top


def completion_logprobs(body: dict) -> tuple[bool, int]:
    # The legacy endpoint's logprobs is the number of alternatives per token (null: none at all).
    v = body.get("logprobs")
    if v is None:
        return False, 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limits.MAX_TOP_LOGPROBS:
        raise bad("logprobs", f"expected an integer in [0, {limits.MAX_TOP_LOGPROBS}]")
    return True, v
