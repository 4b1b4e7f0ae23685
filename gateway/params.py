"""OpenAI request bodies to generation parameters: validated once, BAD_REQUEST naming the field.
The wire's bounds (protocol.limits) are checked here too, so a request the supervisor would refuse
is refused where it is read, with the OpenAI name of its field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from protocol import errors as E
from protocol import limits

# OpenAI's documented default for the legacy completions endpoint; chat has none (the context),
# so it gets the client library's default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class GenParams:
    model: str
    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = CHAT_DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carrying usage

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of SupervisorClient.generate."""
        return {"prompt": self.prompt, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop}


def _bad(param: str, problem: str) -> E.LmxError:
    return E.BadRequest(f"{param}: {problem}", param=param)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    # bool is an int in Python; JSON true is not a number.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(name, f"expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(name, f"expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _bad("stop", "expected a non-empty string or a list of them")
    if len(v) > limits.MAX_STOP or any(len(s) > limits.MAX_STOP_CHARS for s in v):
        raise _bad("stop", f"at most {limits.MAX_STOP} strings of at most {limits.MAX_STOP_CHARS} characters")
    return v


def _text_limit(param: str, chars: int) -> None:
    if chars > limits.MAX_PROMPT_CHARS:
        raise _bad(param, f"{chars} characters, more than {limits.MAX_PROMPT_CHARS}")


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    # The array form: only text parts can reach a text model.
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "expected a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "expected a non-empty list of {role, content}")
    if len(msgs) > limits.MAX_MESSAGES:
        raise _bad("messages", f"{len(msgs)} messages, more than {limits.MAX_MESSAGES}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not 0 < len(m["role"]) <= limits.MAX_NAME_CHARS:
            raise _bad(f"messages[{i}]", "expected an object with a short string role")
        out.append({"role": m["role"], "content": _content(i, m.get("content"))})
    _text_limit("messages", sum(len(m["content"]) + len(m["role"]) for m in out))
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:  # the SDK's batch form, with a batch of one
        p = p[0]
    if not isinstance(p, str):
        raise _bad("prompt", "expected a string (batches and token arrays are not supported)")
    _text_limit("prompt", len(p))
    return p


def _common(body: Any, default_max_tokens: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise E.BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= limits.MAX_NAME_CHARS:
        raise _bad("model", "expected a model id")
    if body.get("n") not in (None, 1):
        raise _bad("n", "only n = 1 is supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"expected a boolean, got {stream!r}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options", "expected an object")
    # max_completion_tokens is the newer name; when both are given it wins, as in OpenAI's API.
    max_tokens = _int(body, "max_completion_tokens", 1, limits.MAX_TOKENS) \
        or _int(body, "max_tokens", 1, limits.MAX_TOKENS) or default_max_tokens
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "seed": _int(body, "seed", 0, limits.MAX_SEED),
        "stop": _stop(body),
        "stream": stream,
        "include_usage": bool(opts.get("include_usage", False)),
    }


def chat(body: Any) -> GenParams:
    """POST /v1/chat/completions. Unknown fields are ignored, as OpenAI-compatible servers do."""
    common = _common(body, CHAT_DEFAULT_MAX_TOKENS)
    return GenParams(messages=_messages(body), **common)


def completion(body: Any) -> GenParams:
    """POST /v1/completions."""
    common = _common(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    return GenParams(prompt=_prompt(body), **common)
