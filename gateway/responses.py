"""OpenAI Responses API requests (`POST /v1/responses`, `POST /v1/responses/input_tokens`) to
generation parameters. Input items become the chat messages templates read: messages keep their
role and text, `function_call` items become the assistant's `tool_calls`, `function_call_output`
items `role: "tool"` messages, `reasoning` items the assistant's `reasoning_content`. Responses'
flat tools, its tool_choice and text.format are rewritten in chat's shape and checked by
gateway/agent.py, so every dialect ends at one set of checks; the wire's bounds come from
protocol.limits. The routes and their handlers: gateway/responses_api.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway import agent, fields, params
from gateway.params import GenParams
from protocol import errors as E
from protocol import limits

bad = agent.bad

# No client library sets one and OpenAI's own bound is the context: room for an agent's turn.
DEFAULT_MAX_OUTPUT_TOKENS = 4096

# Keys each input item type may carry beside `type` (a null in any other counts as absent).
_ITEM_KEYS = {
    "message": ("role", "content", "id", "status", "phase"),
    "function_call": ("call_id", "name", "arguments", "id", "status", "namespace"),
    "function_call_output": ("call_id", "output", "id", "status"),
    "reasoning": ("id", "summary", "content", "encrypted_content", "status"),
}
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_TOOL_KEYS = ("type", "name", "description", "parameters", "strict")


def _text_parts(where: str, content: Any) -> str:
    """A string, or parts with text: input_text / output_text (and a refusal, as its text)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content parts")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if (kind not in _TEXT_PARTS and kind != "refusal") or not isinstance(part.get(key), str):
            raise bad(f"{where}[{j}]", f"content part type {str(kind)[:64]!r} is not supported (text models read "
                                       f"input_text and output_text parts)")
        out.append(part[key])
    return "".join(out)


def _reasoning_text(where: str, item: dict) -> str:
    """The thinking a reasoning item carries: its reasoning_text content (what this gateway writes),
    else its summary. encrypted_content is another provider's: nothing a local model can read."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                      for p in parts):
                raise bad(f"{where}.{key}", "expected a list of {type, text} parts")
            return "".join(p["text"] for p in parts)
    return ""


class _Conversation:
    """Items to chat messages. A turn of the assistant is one message: its reasoning, its text and
    its calls, however many items the Responses API spread it over."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self._thinking: list[str] = []

    def _assistant(self, new: bool) -> dict:
        last = self.messages[-1] if self.messages else None
        if new or last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            self.messages.append(last)
        if self._thinking:
            last["reasoning_content"] = last.get("reasoning_content", "") + "".join(self._thinking)
            self._thinking = []
        return last

    def message(self, where: str, item: dict) -> None:
        role = item.get("role")
        if role not in _ROLES:
            raise bad(f"{where}.role", f"expected one of {', '.join(_ROLES)}")
        text = _text_parts(f"{where}.content", item.get("content"))
        if role != "assistant":
            self._thinking = []  # thinking with no answer after it: nothing to attach it to
            self.messages.append({"role": "system" if role == "developer" else role, "content": text})
            return
        last = self.messages[-1] if self.messages else None
        # A reasoning item opened this turn: its text belongs to the same message.
        fresh = not (last is not None and last["role"] == "assistant" and not last["content"]
                     and "tool_calls" not in last)
        self._assistant(new=fresh)["content"] = text

    def call(self, where: str, item: dict) -> None:
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
            raise bad(where, "expected {type: \"function_call\", call_id, name, arguments}")
        raw = {"id": item["call_id"], "type": "function",
               "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
        (call,) = agent.tool_calls(where, [raw])
        turn = self._assistant(new=False)
        turn.setdefault("tool_calls", []).append(call)

    def output(self, where: str, item: dict) -> None:
        if not isinstance(item.get("call_id"), str):
            raise bad(f"{where}.call_id", "expected the call_id of the function_call it answers")
        self._thinking = []
        text = _text_parts(f"{where}.output", item.get("output"))
        self.messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})

    def reasoning(self, where: str, item: dict) -> None:
        self._thinking.append(_reasoning_text(where, item))


def input_items(body: dict, name: str = "input") -> list[dict]:
    """`input` as a list of items, each checked against its type's keys."""
    v = body.get(name)
    if isinstance(v, str):
        return [{"type": "message", "role": "user", "content": v}]
    if not isinstance(v, list):
        raise bad(name, "expected a string or a list of input items")
    if len(v) > limits.MAX_MESSAGES:
        raise bad(name, f"{len(v)} items, more than {limits.MAX_MESSAGES}")
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise bad(f"{name}[{i}]", "expected an input item object")
        kind = item.get("type", "message")  # EasyInputMessage: {role, content}, no type
        if kind not in _ITEM_KEYS:
            raise bad(f"{name}[{i}].type", f"item type {str(kind)[:64]!r} is not supported (supported: "
                                           f"{', '.join(_ITEM_KEYS)})")
        for key, value in item.items():
            if key != "type" and key not in _ITEM_KEYS[kind] and value is not None:
                raise bad(f"{name}[{i}].{str(key)[:64]}", "unknown item field")
    return v


def messages(items: list[dict], instructions: str | None, name: str = "input") -> list[dict]:
    """Items (a stored conversation's, then the request's) as chat messages, instructions first."""
    conv = _Conversation()
    if instructions:
        conv.messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        kind = item.get("type", "message")
        {"message": conv.message, "function_call": conv.call, "function_call_output": conv.output,
         "reasoning": conv.reasoning}[kind](where, item)
    if not conv.messages:
        raise bad(name, "expected at least one message")
    if len(conv.messages) > limits.MAX_MESSAGES:
        raise bad(name, f"{len(conv.messages)} messages, more than {limits.MAX_MESSAGES}")
    chars = sum(agent.message_chars(m) for m in conv.messages)
    if chars > limits.MAX_PROMPT_CHARS:
        raise bad(name, f"{chars} characters, more than {limits.MAX_PROMPT_CHARS}")
    return conv.messages


def _function(where: str, tool: dict) -> dict:
    for key, value in tool.items():
        if key not in _TOOL_KEYS and value is not None:
            raise bad(f"{where}.{str(key)[:64]}", "unknown tool field")
    fn = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    for key in ("description", "strict"):
        if tool.get(key) is not None:
            fn[key] = tool[key]
    return {"type": "function", "function": fn}


def _tools(body: dict) -> tuple[list[dict] | None, dict[str, str]]:
    """Responses' flat function tools in chat's shape, and the namespace of each namespaced one
    (Codex groups tools as {type: "namespace", name, tools}; a call of one names its namespace).
    Web search, which Codex offers by default, is not offered to the model: there is none here,
    and a model without it answers without searching, which is true. Any other built-in tool is
    refused by its type."""
    v = body.get("tools")
    if v is None or v == []:
        return None, {}
    if not isinstance(v, list) or len(v) > limits.MAX_TOOLS:
        raise bad("tools", f"expected a list of at most {limits.MAX_TOOLS} function tools")
    out, spaces = [], {}
    for j, tool in enumerate(v):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            out.append(_function(f"tools[{j}]", tool))
        elif kind == "namespace" and isinstance(tool.get("name"), str) and isinstance(tool.get("tools"), list):
            for k, inner in enumerate(tool["tools"]):
                if not isinstance(inner, dict) or inner.get("type") != "function":
                    raise bad(f"tools[{j}].tools[{k}]", "a namespace holds function tools")
                out.append(_function(f"tools[{j}].tools[{k}]", inner))
                spaces.setdefault(str(inner.get("name")), tool["name"])
        elif not (isinstance(kind, str) and kind.startswith("web_search")):
            raise bad(f"tools[{j}]", f"tool type {str(kind)[:64]!r} is not available: this gateway runs no built-in "
                                     f"tools (file search, code interpreter, computer use, MCP...); only function "
                                     f"tools")
    if len(out) > limits.MAX_TOOLS:
        raise bad("tools", f"{len(out)} function tools, more than {limits.MAX_TOOLS}")
    return agent.tools({"tools": out}), spaces


def _tool_choice(body: dict, tools: list[dict] | None) -> dict[str, Any]:
    v = body.get("tool_choice")
    if isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("name"), str):
        v = {"type": "function", "function": {"name": v["name"]}}
    elif v is not None and v not in ("auto", "none", "required"):
        raise bad("tool_choice", "expected \"auto\", \"none\", \"required\" or {type: \"function\", name} "
                                 "(there are no built-in tools)")
    return agent.tool_choice(v, tools, "tool_choice")


def _response_format(body: dict) -> dict | None:
    """text.format in chat's response_format shape: the worker's constrained decoding enforces it."""
    v = body.get("text")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("text", "expected an object")
    for key, value in v.items():
        if key not in ("format", "verbosity") and value is not None:
            raise bad(f"text.{str(key)[:64]}", "unknown field")
    fmt = v.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad("text.format.schema", "expected a JSON Schema object")
        spec = {"name": fmt.get("name") or "output", "schema": fmt["schema"], "strict": bool(fmt.get("strict"))}
        return agent.response_format({"response_format": {"type": "json_schema", "json_schema": spec}})
    if kind in ("text", "json_object"):
        return agent.response_format({"response_format": {"type": kind}})
    raise bad("text.format", "expected type text, json_object or json_schema")


def _effort(body: dict) -> dict[str, Any]:
    v = body.get("reasoning")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("reasoning", "expected an object")
    for key, value in v.items():
        if key not in ("effort", "summary", "generate_summary") and value is not None:
            raise bad(f"reasoning.{str(key)[:64]}", "unknown field")
    return agent.effort("reasoning.effort", v.get("effort"))


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"expected a boolean, got {v!r}")
    return v


def _string(body: dict, name: str, limit: int) -> str | None:
    v = body.get(name)
    if v is not None and (not isinstance(v, str) or len(v) > limit):
        raise bad(name, f"expected a string of at most {limit} characters")
    return v


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed request, before its stored conversation (previous_response_id) is read."""

    model: str
    items: list[dict]
    instructions: str | None
    previous_response_id: str | None
    agent: dict[str, Any]
    namespaces: dict[str, str] = field(default_factory=dict)  # tool name -> its namespace
    max_output_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stream: bool = False
    store: bool = True
    body: dict = field(default_factory=dict)  # what the response object echoes

    def params(self, history: list[dict]) -> GenParams:
        """The generation, the conversation so far (`history`, items) before this input."""
        return GenParams(model=self.model, messages=messages([*history, *self.items], self.instructions),
                         max_tokens=self.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS,
                         temperature=self.temperature, top_p=self.top_p, stream=self.stream, agent=self.agent)


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise E.BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= limits.MAX_NAME_CHARS:
        raise bad("model", "expected a model id")
    return model


def _agent(body: dict, tools: list[dict] | None) -> dict[str, Any]:
    """The agent fields as SupervisorClient.generate takes them (only those set)."""
    kwargs = agent.template_kwargs(_effort(body), agent.chat_template_kwargs(body))
    out: dict[str, Any] = {"tools": tools, **_tool_choice(body, tools), "response_format": _response_format(body),
                           "chat_template_kwargs": kwargs, "top_k": agent.top_k(body)}
    out = {k: v for k, v in out.items() if v}
    if not _flag(body, "parallel_tool_calls", True) and tools:
        out["parallel_tool_calls"] = False  # at most one call: the worker ends the generation when it closes
    return out


def _metadata(body: dict) -> dict:
    v = body.get("metadata")
    if v is None:
        return {}
    # OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512.
    if not isinstance(v, dict) or len(v) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(s, str) and len(s) <= 512 for k, s in v.items()):
        raise bad("metadata", "expected at most 16 string pairs (keys ≤ 64, values ≤ 512 characters)")
    return v


def parse(body: Any) -> ResponsesRequest:
    """POST /v1/responses. A field it cannot honour is refused (gateway/fields.py)."""
    model = _model(body)
    fields.check_responses(body)
    max_out = body.get("max_output_tokens")
    if max_out is not None and (isinstance(max_out, bool) or not isinstance(max_out, int)
                                or not 1 <= max_out <= limits.MAX_TOKENS):
        raise bad("max_output_tokens", f"expected an integer in [1, {limits.MAX_TOKENS}], got {max_out!r}")
    tools, spaces = _tools(body)
    echo = {"metadata": _metadata(body), "user": _string(body, "user", limits.MAX_NAME_CHARS),
            "service_tier": _string(body, "service_tier", limits.MAX_NAME_CHARS),
            "truncation": _string(body, "truncation", limits.MAX_NAME_CHARS),
            **{k: body.get(k) for k in ("tools", "tool_choice", "text", "reasoning", "parallel_tool_calls")}}
    return ResponsesRequest(
        model=model, items=input_items(body), instructions=_string(body, "instructions", limits.MAX_PROMPT_CHARS),
        previous_response_id=_string(body, "previous_response_id", limits.MAX_ID_CHARS),
        agent=_agent(body, tools), namespaces=spaces, max_output_tokens=max_out,
        temperature=params.number(body, "temperature", 0.0, 0.0, 2.0), top_p=params.number(body, "top_p", 1.0, 0.0, 1.0),
        stream=_flag(body, "stream", False), store=_flag(body, "store", True), body=echo)


def parse_count(body: Any) -> ResponsesRequest:
    """POST /v1/responses/input_tokens: what the prompt of the same create would hold."""
    model = _model(body)
    fields.check_input_tokens(body)
    tools, _ = _tools(body)
    return ResponsesRequest(
        model=model, items=input_items(body) if body.get("input") is not None else [],
        instructions=_string(body, "instructions", limits.MAX_PROMPT_CHARS),
        previous_response_id=_string(body, "previous_response_id", limits.MAX_ID_CHARS), agent=_agent(body, tools))
