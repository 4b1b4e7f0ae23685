"""Anthropic Messages API requests (`POST /v1/messages`) to generation parameters. Anthropic's
content blocks become the OpenAI-style messages chat templates are written for: tool_use blocks an
assistant message's `tool_calls`, tool_result blocks `role: "tool"` messages with `tool_call_id`,
thinking blocks the assistant's `reasoning_content` (when their signature proves this gateway
wrote them; any other is passed on as the turn's text), `system` and any `role: "system"` message
the first message. What it cannot honour is refused with a 400 naming the field
(gateway/fields.py), as on the OpenAI side."""

from __future__ import annotations

from typing import Any

from gateway import agent, context_edits, fields, params
from gateway.params import GenParams
from gateway.signing import ThinkingSigner
from protocol import errors as E
from protocol import limits

bad = agent.bad

# Keys each block type may carry. cache_control is accepted everywhere and ignored: the worker's
# prefix cache reuses every prompt prefix it holds without being told where the breakpoints are.
_BLOCK_KEYS = {
    "text": ("text", "cache_control", "citations"),
    "tool_use": ("id", "name", "input", "cache_control"),
    "tool_result": ("tool_use_id", "content", "is_error", "cache_control"),
    "thinking": ("thinking", "signature", "cache_control"),
    # Claude's encrypted thinking: nothing a local model can read, dropped from the history.
    "redacted_thinking": ("data",),
}
_USER_BLOCKS = ("text", "tool_result")
_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _blocks(where: str, content: Any, allowed: tuple[str, ...]) -> list[dict]:
    """Content as a list of blocks, each checked against its type's keys."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content blocks")
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            raise bad(f"{where}[{j}]", f"block type {str(kind)[:64]!r} is not supported here "
                                       f"(supported: {', '.join(allowed)})")
        for key, value in block.items():
            if key != "type" and key not in _BLOCK_KEYS[kind] and value is not None:
                raise bad(f"{where}[{j}].{str(key)[:64]}", "unknown block field")
        if kind == "text" and "text" not in block:
            raise bad(f"{where}[{j}].text", "a text block needs its text")
        for key in ("text", "thinking", "name", "tool_use_id"):
            if key in _BLOCK_KEYS[kind] and key in block and not isinstance(block[key], str):
                raise bad(f"{where}[{j}].{key}", "expected a string")
    return content


def _text_blocks(where: str, content: Any) -> str:
    return "".join(b["text"] for b in _blocks(where, content, ("text",)))


def _tool_result(where: str, block: dict) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise bad(f"{where}.tool_use_id", "expected the id of the tool_use it answers")
    text = _text_blocks(f"{where}.content", block.get("content") or "")
    if block.get("is_error"):
        # The template has no place for the flag; the model reads it in the result instead.
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _user(where: str, content: Any) -> list[dict]:
    """One user turn: text blocks stay one user message; each tool_result is a tool message."""
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(_blocks(f"{where}.content", content, _USER_BLOCKS)):
        if block["type"] == "text":
            text.append(block["text"])
            continue
        if text:
            out.append({"role": "user", "content": "".join(text)})
            text = []
        out.append(_tool_result(f"{where}.content[{j}]", block))
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _tool_use(where: str, block: dict) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad(where, "expected {id, name, input}")
    args = block.get("input", {})
    if not isinstance(args, dict):
        raise bad(f"{where}.input", "expected an object")
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": args}}


def _assistant(where: str, content: Any, signer: ThinkingSigner | None) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    text, thinking, calls = [], [], []
    for j, block in enumerate(_blocks(f"{where}.content", content, _ASSISTANT_BLOCKS)):
        if block["type"] == "text":
            text.append(block["text"])
        elif block["type"] == "thinking":
            said = block.get("thinking") or ""
            if signer is None or signer.verify(said, block.get("signature")):
                thinking.append(said)
            else:  # not this gateway's (another model's, or edited): the model reads it as text
                text.append(said)
        elif block["type"] == "tool_use":
            calls.append(_tool_use(f"{where}.content[{j}]", block))
    msg["content"] = "".join(text)
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(body: dict, signer: ThinkingSigner | None) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of {role, content}")
    system, out = _system(body), []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise bad(where, "expected an object with role user, assistant or system")
        for key in m:
            if key not in ("role", "content"):
                raise bad(f"{where}.{str(key)[:64]}", "unknown message field")
        if m["role"] == "system":  # merged into the system prompt, as Anthropic does
            system.append(_text_blocks(f"{where}.content", m.get("content")))
        elif m["role"] == "user":
            out.extend(_user(where, m.get("content")))
        else:
            out.append(_assistant(where, m.get("content"), signer))
    if not out:
        raise bad("messages", "expected at least one user or assistant message")
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if len(out) > limits.MAX_MESSAGES:
        raise bad("messages", f"{len(out)} messages, more than {limits.MAX_MESSAGES}")
    chars = sum(agent.message_chars(m) for m in out)
    if chars > limits.MAX_PROMPT_CHARS:
        raise bad("messages", f"{chars} characters, more than {limits.MAX_PROMPT_CHARS}")
    return out


def _system(body: dict) -> list[str]:
    v = body.get("system")
    if v is None:
        return []
    return [_text_blocks("system", v)]


def _tools(body: dict) -> list[dict] | None:
    """Anthropic's client tools as OpenAI function tools, which is what chat templates render."""
    v = body.get("tools")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > limits.MAX_TOOLS:
        raise bad("tools", f"expected a list of at most {limits.MAX_TOOLS} tools")
    out = []
    for j, tool in enumerate(v):
        ok = isinstance(tool, dict) and tool.get("type") in (None, "custom") and isinstance(tool.get("name"), str) \
            and tool["name"] and isinstance(tool.get("input_schema"), dict)
        if not ok:
            raise bad(f"tools[{j}]", "expected {name, description?, input_schema} (server tools are not supported)")
        for key in tool:
            # defer_loading (tool search) is advisory: every tool is in the prompt, none is deferred.
            if key not in ("type", "name", "description", "input_schema", "cache_control", "defer_loading"):
                raise bad(f"tools[{j}].{str(key)[:64]}", "unknown tool field")
        fn = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(body: dict, tools: list[dict] | None) -> dict[str, Any]:
    v = body.get("tool_choice")
    if v is None:
        return {}
    kind = v.get("type") if isinstance(v, dict) else None
    single = isinstance(v, dict) and v.get("disable_parallel_tool_use")
    if single is not None and single is not False and single is not True:
        raise bad("tool_choice.disable_parallel_tool_use", "expected a boolean")
    openai = {"auto": "auto", "none": "none", "any": "required"}.get(kind)
    if openai is None and kind == "tool" and isinstance(v.get("name"), str):
        openai = {"type": "function", "function": {"name": v["name"]}}
    if openai is None:
        raise bad("tool_choice", "expected {type: auto | any | tool (with name) | none}")
    out = agent.tool_choice(openai, tools, "tool_choice")
    if single and tools:  # at most one call: the worker ends the generation when it closes
        out["parallel_tool_calls"] = False
    return out


def _thinking(body: dict) -> tuple[dict[str, Any], int | None]:
    """Anthropic's thinking switch as the chat template's enable_thinking (Qwen3 and others read
    it), and budget_tokens as the worker's thinking budget: after that many thinking tokens it
    makes the model close its think block and answer. Without `thinking`, or with "adaptive" (the
    model decides), the template's own default holds."""
    v = body.get("thinking")
    if v is None:
        return {}, None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "disabled":
        return {"enable_thinking": False}, None
    if kind not in ("enabled", "adaptive"):
        raise bad("thinking", "expected {type: enabled, budget_tokens}, {type: adaptive} or {type: disabled}")
    # display (summarized, omitted, updates) is advisory: the thinking comes back whole, as written.
    if v.get("display") is not None and not isinstance(v.get("display"), str):
        raise bad("thinking.display", "expected a string")
    budget = v.get("budget_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or not 1 <= budget <= limits.MAX_TOKENS):
        raise bad("thinking.budget_tokens", f"expected an integer in [1, {limits.MAX_TOKENS}]")
    return ({"enable_thinking": True}, budget) if kind == "enabled" else ({}, budget)


def _output_config(body: dict) -> tuple[dict | None, dict[str, Any]]:
    """output_config.format (structured outputs) as OpenAI's response_format json_schema: the
    worker's constrained decoding enforces it. output_config.effort as the template's reasoning
    switches (gateway/agent.py: effort)."""
    v = body.get("output_config")
    if v is None:
        return None, {}
    if not isinstance(v, dict):
        raise bad("output_config", "expected an object")
    for key, value in v.items():
        if key not in ("format", "effort") and value is not None:
            raise bad(f"output_config.{str(key)[:64]}", "unknown field")
    effort = agent.effort("output_config.effort", v.get("effort"))
    fmt = v.get("format")
    if fmt is None:
        return None, effort
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format", "expected {type: json_schema, schema}")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}, effort


def _stop_sequences(body: dict) -> list[str]:
    v = body.get("stop_sequences")
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad("stop_sequences", "expected a list of non-empty strings")
    if len(v) > limits.MAX_STOP or any(len(s) > limits.MAX_STOP_CHARS for s in v):
        raise bad("stop_sequences", f"at most {limits.MAX_STOP} strings of at most {limits.MAX_STOP_CHARS} characters")
    return v


def _head(body: Any) -> tuple[str, int, bool]:
    if not isinstance(body, dict):
        raise E.BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= limits.MAX_NAME_CHARS:
        raise bad("model", "expected a model id")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.MAX_TOKENS:
        raise bad("max_tokens", f"required: an integer in [1, {limits.MAX_TOKENS}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"expected a boolean, got {stream!r}")
    fields.check_messages(body)
    return model, max_tokens, stream


def parse(body: Any, signer: ThinkingSigner | None = None) -> GenParams:
    """POST /v1/messages. `signer` verifies the thinking blocks a client sends back."""
    model, max_tokens, stream = _head(body)
    tools = _tools(body)
    switches, budget = _thinking(body)
    response_format, effort = _output_config(body)
    extra: dict[str, Any] = {"tools": tools, **_tool_choice(body, tools), "top_k": agent.top_k(body),
                             "chat_template_kwargs": agent.template_kwargs({**effort, **switches}, None),
                             "response_format": response_format, "thinking_budget": budget}
    return GenParams(model=model, messages=_messages(body, signer), max_tokens=max_tokens,
                     temperature=params.number(body, "temperature", 1.0, 0.0, 1.0), top_p=params.number(body, "top_p", 1.0, 0.0, 1.0),
                     stop=_stop_sequences(body), stream=stream,
                     agent={k: v for k, v in extra.items() if v or k == "parallel_tool_calls"},
                     context_edits=context_edits.parse(body.get("context_management")))


def parse_count(body: Any, signer: ThinkingSigner | None = None) -> GenParams:
    """POST /v1/messages/count_tokens: a Messages body whose max_tokens may be absent (nothing is
    generated), so it takes the smallest one for the checks."""
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body = {**body, "max_tokens": 1}
    return parse(body, signer)
