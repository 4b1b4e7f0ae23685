"""Which request fields each endpoint knows, and what it does with each: honoured, advisory (accepted
and ignored, because ignoring them changes nothing a client can observe), or refused unless at a
value that asks for nothing (null, OpenAI's default). Anything else is a 400 naming the field: a
client that sends `frequency_penalty: 0.5` or a field we never heard of learns that it was not
applied, instead of getting an answer made without it. docs/gateway.md lists the same tables, and
tests/test_gateway_agent.py checks that it lists every field here."""

from __future__ import annotations

from typing import Any, Callable

from protocol import errors as E

# Honoured: read by gateway/params.py (OpenAI) or gateway/anthropic.py (Anthropic).
CHAT_HONOURED = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "stream", "stream_options", "n", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "logprobs", "top_logprobs", "chat_template_kwargs", "top_k",
)
COMPLETION_HONOURED = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
    "n", "logprobs", "top_k", "echo", "best_of", "suffix",
)
MESSAGES_HONOURED = (
    "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
    "tool_choice", "thinking", "stream", "output_config",
)

# Advisory: bookkeeping for the caller's side (who asked, what to store, which tier to bill), or a
# hint whose job something else already does (prompt_cache_key: the worker's prefix cache matches
# prefixes by itself). Nothing a client observes depends on them here.
OPENAI_ADVISORY = ("user", "metadata", "service_tier", "store", "prompt_cache_key", "safety_identifier")
# cache_control (top level, as on blocks): the prefix cache reuses every prefix without breakpoints.
MESSAGES_ADVISORY = ("metadata", "service_tier", "cache_control", "user_profile_id")


def _null(v: Any) -> bool:
    return v is None


def _zero(v: Any) -> bool:
    return v is None or (not isinstance(v, bool) and v == 0)


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == []


# Refused unless the value asks for nothing. The reason is part of the 400's message.
_OPENAI_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (_zero, "penalties are not implemented by the workers"),
    "presence_penalty": (_zero, "penalties are not implemented by the workers"),
    "logit_bias": (_empty, "logit biases are not implemented by the workers"),
    "reasoning_effort": (_null, "a reasoning effort cannot be set on these models; turn thinking off with "
                                "chat_template_kwargs {\"enable_thinking\": false} where the template allows"),
    "verbosity": (_null, "not implemented"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported"),
    "audio": (_null, "only text output is supported"),
    "prediction": (_null, "predicted outputs are not implemented"),
    "web_search_options": (_null, "there is no web search"),
    "functions": (_empty, "the deprecated functions field is not supported: use tools"),
    "function_call": (_null, "the deprecated function_call field is not supported: use tool_choice"),
}
_MESSAGES_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "container": (_null, "there are no containers"),
    "mcp_servers": (_empty, "MCP servers are not supported"),
    "context_management": (_null, "context management is not supported"),
    "inference_geo": (_null, "there is one place of inference: this machine"),
    "diagnostics": (_null, "prompt-cache diagnostics are not reported"),
    "speed": (lambda v: v in (None, "standard"), "there is one speed"),
}

CHAT_REFUSED = tuple(_OPENAI_REFUSED)
MESSAGES_REFUSED = tuple(_MESSAGES_REFUSED)


def _check(body: dict, honoured: tuple[str, ...], advisory: tuple[str, ...],
           refused: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, value in body.items():
        if name in honoured or name in advisory:
            continue
        rule = refused.get(name)
        if rule is not None:
            harmless, why = rule
            if harmless(value):
                continue
            raise E.BadRequest(f"{name}: {why}", param=name)
        raise E.BadRequest(f"{str(name)[:64]}: unknown field; the gateway does not silently ignore fields "
                           f"(docs/gateway.md lists the ones it takes)", param=str(name)[:64])


def check_chat(body: dict) -> None:
    _check(body, CHAT_HONOURED, OPENAI_ADVISORY, _OPENAI_REFUSED)


def check_completion(body: dict) -> None:
    _check(body, COMPLETION_HONOURED, OPENAI_ADVISORY, _OPENAI_REFUSED)


def check_messages(body: dict) -> None:
    _check(body, MESSAGES_HONOURED, MESSAGES_ADVISORY, _MESSAGES_REFUSED)
