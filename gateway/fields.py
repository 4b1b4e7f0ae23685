"""Which request fields each endpoint knows, and what it does with each: honoured, advisory (accepted
and ignored, because ignoring them changes nothing a client can observe, or a hint the model's
template may not have a place for), or refused unless at a value that asks for nothing (null,
OpenAI's default).

The rule: a field that a widely used client sends by default is never a 400 — it is honoured or
advisory. A field is refused only where accepting it would return something false (an answer
made with a penalty that was never applied, a schema that was not enforced). An unknown field is
a 400 naming it. docs/gateway.md lists the same tables, tests/test_gateway_agent.py checks that it
lists every field here, and tests/test_client_captures.py that every field the pinned clients send
is honoured or advisory."""

from __future__ import annotations

from typing import Any, Callable

from protocol import errors as E

# Honoured: read by gateway/params.py (OpenAI) or gateway/anthropic.py (Anthropic).
CHAT_HONOURED = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "stream", "stream_options", "n", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "logprobs", "top_logprobs", "chat_template_kwargs", "top_k", "reasoning_effort",
)
COMPLETION_HONOURED = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
    "n", "logprobs", "top_k", "echo", "best_of", "suffix",
)
MESSAGES_HONOURED = (
    "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
    "tool_choice", "thinking", "stream", "output_config", "context_management",
)

# Advisory: bookkeeping for the caller's side (who asked, what to store, which tier to bill), or a
# hint whose job something else already does (prompt_cache_key: the worker's prefix cache matches
# prefixes by itself) or that these models have no switch for (verbosity). Nothing a client
# observes depends on them here.
OPENAI_ADVISORY = ("user", "metadata", "service_tier", "store", "prompt_cache_key", "safety_identifier",
                   "verbosity")
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
    "inference_geo": (_null, "there is one place of inference: this machine"),
    "diagnostics": (_null, "prompt-cache diagnostics are not reported"),
    "speed": (lambda v: v in (None, "standard"), "there is one speed"),
}

CHAT_REFUSED = tuple(_OPENAI_REFUSED)
MESSAGES_REFUSED = tuple(_MESSAGES_REFUSED)

# POST /v1/responses (gateway/responses.py). metadata is stored and echoed; store and
# previous_response_id keep and continue conversations (gateway/responses_store.py).
RESPONSES_HONOURED = (
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "max_output_tokens",
    "temperature", "top_p", "reasoning", "stream", "store", "previous_response_id", "metadata", "top_k",
    "chat_template_kwargs",
)
# include names extra output (encrypted reasoning, logprobs...) nothing here has; client_metadata is
# Codex's ids for its own logs; truncation "auto"
# would drop items from a prompt over the context, which here is an error instead; max_tool_calls
# bounds built-in tool calls, and there are none.
RESPONSES_ADVISORY = ("user", "service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                      "safety_identifier", "truncation", "include", "stream_options", "max_tool_calls",
                      "client_metadata")
_RESPONSES_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "background": (lambda v: v in (None, False), "background responses are not run: stream or wait instead"),
    "conversation": (_null, "conversations are not kept: chain responses with previous_response_id"),
    "prompt": (_null, "stored prompt templates are not available"),
    "top_logprobs": (_zero, "this endpoint returns no logprobs"),
    "context_management": (_empty, "server-side compaction is not implemented"),
    "moderation": (_null, "there is no moderation model"),
    "image": (_null, "only text output is supported"),
    "access_programs": (_null, "not applicable here"),
}
RESPONSES_REFUSED = tuple(_RESPONSES_REFUSED)
# POST /v1/responses/input_tokens: the fields that shape the prompt.
INPUT_TOKENS_HONOURED = ("model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                         "reasoning", "previous_response_id", "chat_template_kwargs")
INPUT_TOKENS_ADVISORY = ("truncation", "personality")
# POST /v1/embeddings (gateway/embeddings.py): user is the caller's bookkeeping, as for chat.
EMBEDDINGS_HONOURED = ("model", "input", "encoding_format", "dimensions")
EMBEDDINGS_ADVISORY = ("user",)
# POST /v1/rerank (gateway/rerank.py), the Jina/Cohere shape. Cohere's knobs that change a score
# (its own chunking and truncation of documents, fields of structured documents) are refused when
# set: the scores would not be what they asked for.
RERANK_HONOURED = ("model", "query", "documents", "top_n", "return_documents")
RERANK_ADVISORY = ("user",)
_RERANK_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens_per_doc": (_null, "a document is cut only at the model's position limit"),
    "max_chunks_per_doc": (_null, "a document is not split into chunks; it is cut at the model's position limit"),
    "rank_fields": (_null, "a document is a string or {\"text\": ...}; other fields are not ranked"),
}
RERANK_REFUSED = tuple(_RERANK_REFUSED)


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


def check_responses(body: dict) -> None:
    _check(body, RESPONSES_HONOURED, RESPONSES_ADVISORY, _RESPONSES_REFUSED)


def check_input_tokens(body: dict) -> None:
    _check(body, INPUT_TOKENS_HONOURED, INPUT_TOKENS_ADVISORY, {"conversation": _RESPONSES_REFUSED["conversation"]})


def check_embeddings(body: dict) -> None:
    _check(body, EMBEDDINGS_HONOURED, EMBEDDINGS_ADVISORY, {})


def check_rerank(body: dict) -> None:
    _check(body, RERANK_HONOURED, RERANK_ADVISORY, _RERANK_REFUSED)


def checked_body(value: Any, check: Callable[[dict], None]) -> tuple[dict, str]:
    """A body that is a JSON object carrying only the fields `check` allows, and naming a model:
    (the body, its model). For the endpoints that are no generation (embeddings, rerank)."""
    if not isinstance(value, dict):
        raise E.BadRequest("the request body must be a JSON object")
    check(value)
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise E.BadRequest("model: a model id is required", param="model")
    return value, model
