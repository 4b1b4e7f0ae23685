"""OpenAI request bodies to generation parameters: validated once, BAD_REQUEST naming the field.
The wire's bounds (protocol.limits) are checked here too, so a request the supervisor would refuse
is refused where it is read, with the OpenAI name of its field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway import agent, fields
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
    # What agents send (gateway/agent.py): only those set travel, so a request without them is the
    # same wire message as before they existed (an adopted older worker still serves it).
    agent: dict[str, Any] = field(default_factory=dict)
    # Anthropic's context_management edits (gateway/context_edits.py), applied to `messages` before
    # the generation starts; None when the request named none.
    context_edits: tuple | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of SupervisorClient.generate."""
        return {"prompt": self.prompt, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
                **self.agent}

    @property
    def logprobs(self) -> bool:
        return bool(self.agent.get("logprobs"))


def _bad(param: str, problem: str) -> E.LmxError:
    return E.BadRequest(f"{param}: {problem}", param=param)


def number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    """body[name] as a finite number in [lo, hi] (JSON true is not one), or `default` when absent."""
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


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "expected a non-empty list of {role, content}")
    if len(msgs) > limits.MAX_MESSAGES:
        raise _bad("messages", f"{len(msgs)} messages, more than {limits.MAX_MESSAGES}")
    out = [agent.chat_message(i, m) for i, m in enumerate(msgs)]
    _text_limit("messages", sum(agent.message_chars(m) for m in out))
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
    # include_obfuscation pads chunks against length side channels on OpenAI's side: advisory here.
    for key in opts:
        if key not in ("include_usage", "include_obfuscation"):
            raise _bad(f"stream_options.{str(key)[:64]}", "unknown field")
    # max_completion_tokens is the newer name; when both are given it wins, as in OpenAI's API.
    max_tokens = _int(body, "max_completion_tokens", 1, limits.MAX_TOKENS) \
        or _int(body, "max_tokens", 1, limits.MAX_TOKENS) or default_max_tokens
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 0.0, 1.0),
        "seed": _int(body, "seed", 0, limits.MAX_SEED),
        "stop": _stop(body),
        "stream": stream,
        "include_usage": bool(opts.get("include_usage", False)),
    }


def _chat_agent(body: dict) -> dict[str, Any]:
    """The agent fields of a chat request, as SupervisorClient.generate takes them (only those set)."""
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", f"expected a boolean, got {parallel!r}")
    tools = agent.tools(body)
    logprobs, top = agent.chat_logprobs(body)
    kwargs = agent.template_kwargs(agent.effort("reasoning_effort", body.get("reasoning_effort")),
                                   agent.chat_template_kwargs(body))
    out: dict[str, Any] = {"tools": tools, **agent.tool_choice(body.get("tool_choice"), tools),
                           "response_format": agent.response_format(body), "logprobs": logprobs,
                           "top_logprobs": top, "chat_template_kwargs": kwargs, "top_k": agent.top_k(body)}
    out = {k: v for k, v in out.items() if v}
    if parallel is False and tools:
        # At most one call: the worker ends the generation when the first call closes.
        out["parallel_tool_calls"] = False
    return out


def chat(body: Any) -> GenParams:
    """POST /v1/chat/completions. A field it cannot honour is refused (gateway/fields.py)."""
    common = _common(body, CHAT_DEFAULT_MAX_TOKENS)
    fields.check_chat(body)
    return GenParams(messages=_messages(body), agent=_chat_agent(body), **common)


def completion(body: Any) -> GenParams:
    """POST /v1/completions."""
    common = _common(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    fields.check_completion(body)
    if body.get("echo"):
        raise _bad("echo", "echoing the prompt is not supported")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "only best_of = 1 is supported")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "suffixes (fill in the middle) are not supported")
    logprobs, top = agent.completion_logprobs(body)
    extra = {"logprobs": logprobs, "top_logprobs": top, "top_k": agent.top_k(body)}
    return GenParams(prompt=_prompt(body), agent={k: v for k, v in extra.items() if v}, **common)
