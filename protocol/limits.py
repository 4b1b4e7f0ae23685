"""Bounds on decoded messages, past the field types: sizes, nesting, finite numbers. A peer that
breaks one gets BAD_REQUEST naming the field; nothing oversized or non-finite reaches a worker, a
timer or a log line."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from protocol.errors import BadRequest

# msgpack itself stops at these (cheap, in C) before a Python object is built.
MAX_ARRAY_LEN = 100_000
MAX_MAP_LEN = 10_000
# No message of ours nests deeper than ~8 (a status reply's model -> memory map); msgpack's own
# limit is ~1000, deep enough to exhaust recursion in whoever walks the value later (a chat
# template, the JSON log renderer).
MAX_DEPTH = 32
# An HTTP body's JSON, as the gateway parses it (gateway.body): past this it is refused before any
# code walks it (json.loads itself stops near the interpreter's recursion limit, as a RecursionError).
# Looser than MAX_DEPTH, since a body wraps what goes on the wire; what nests deeper there is
# refused there, also as BAD_REQUEST.
MAX_JSON_DEPTH = 64

MAX_ID_CHARS = 128  # request ids, tokens
MAX_NAME_CHARS = 256  # model ids, ops, revisions, phases
MAX_PATH_CHARS = 4096
MAX_PROMPT_CHARS = 2_000_000  # prompt, or every message's text together
MAX_MESSAGES = 4096
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_TOKENS = 1 << 20
MAX_TIMEOUT_S = 7 * 86_400.0
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 64) - 1
MAX_ERROR_CHARS = 1_000_000  # an error message is for people; this only bounds the absurd
MAX_FIGURES = 64  # entries of a worker's memory / usage / timings maps
MAX_TOOLS = 512
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_TOP_K = 1 << 20  # larger than any vocabulary
# A response_format's JSON, as characters. Its grammar is built in the worker's loop before the
# request's first token, at a cost that grows faster than its size (llguidance, a flat object:
# 49 KB 0.12 s, 249 KB 2.3 s, while every other stream of the batch waits): 64 KiB keeps one
# request's build to a fraction of a second.
MAX_SCHEMA_CHARS = 65_536


# An EmbedRequest (OpenAI allows 2048 inputs; its reply, inputs x dims float32, must fit in one
# frame of codec.MAX_FRAME_BYTES, 8 MiB: 256 x 4096 x 4 bytes is 4 MiB). A string input is bounded
# in characters, a token array in tokens; the total too, since the worker tokenizes them all at once.
MAX_EMBED_INPUTS = 256
MAX_EMBED_DIMS = 4096
MAX_EMBED_INPUT_CHARS = 65_536
MAX_EMBED_INPUT_TOKENS = 8192
MAX_EMBED_TOTAL_CHARS = 2_000_000
MAX_EMBED_TOTAL_TOKENS = 262_144
MAX_TOKEN_ID = (1 << 31) - 1
# Padded tokens in one forward pass of an embed worker (inputs x the longest one): its batches are
# cut to this, and the memory estimate budgets the activations of one such pass.
EMBED_BATCH_TOKENS = 8192

UNPACK_OPTIONS = {"max_array_len": MAX_ARRAY_LEN, "max_map_len": MAX_MAP_LEN}


def check_depth(value: Any) -> None:
    if not _depth_ok(value, 1):
        raise BadRequest(f"message nests deeper than {MAX_DEPTH} levels")


def _depth_ok(value: Any, depth: int) -> bool:
    # Recursion is safe here: it stops at MAX_DEPTH, whatever the input's depth.
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list:
        items = value
    else:
        return True
    if depth > MAX_DEPTH:
        return False
    for item in items:
        if type(item) in _CONTAINERS and not _depth_ok(item, depth + 1):
            return False
    return True


_CONTAINERS = (dict, list)  # what msgpack decodes to (use_list=True)


def _text(tag: str, name: str, value: Any, limit: int, empty: bool = True) -> None:
    if value is None:
        return
    if len(value) > limit:
        raise BadRequest(f"{tag}: field {name!r} has {len(value)} characters, more than {limit}")
    if not empty and not value:
        raise BadRequest(f"{tag}: field {name!r} must not be empty")


def _number(tag: str, name: str, value: Any, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{tag}: field {name!r} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{tag}: field {name!r} must be within [{lo}, {hi}], got {value!r}")


def check_request(tag: str, request_id: str, model: str, timeout_s: float | None) -> None:
    """What every request to a model has: its ids, and a deadline of its own (> 0) or none."""
    _text(tag, "request_id", request_id, MAX_ID_CHARS)
    _text(tag, "model", model, MAX_NAME_CHARS)
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise BadRequest(f"{tag}: field 'timeout_s' must be > 0, got {timeout_s!r}")
    _number(tag, "timeout_s", timeout_s, 0.0, MAX_TIMEOUT_S)


def _figures(tag: str, name: str, value: dict, lo: float = 0.0) -> None:
    """A map of named numbers (memory, usage): the supervisor does arithmetic on them."""
    if len(value) > MAX_FIGURES:
        raise BadRequest(f"{tag}: field {name!r} has {len(value)} entries, more than {MAX_FIGURES}")
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > MAX_NAME_CHARS:
            raise BadRequest(f"{tag}: field {name!r} has a key that is not a short string")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise BadRequest(f"{tag}: {name}[{k[:64]!r}] must be a number, got {type(v).__name__}")
        _number(tag, f"{name}[{k[:64]!r}]", v, lo, float(1 << 63))


def _messages(tag: str, messages: list) -> int:
    if not messages or len(messages) > MAX_MESSAGES:
        raise BadRequest(f"{tag}: messages must hold 1..{MAX_MESSAGES} entries, got {len(messages)}")
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or len(m["role"]) > MAX_NAME_CHARS:
            raise BadRequest(f"{tag}: messages[{i}].role must be a short string")
        for k, v in m.items():
            if not isinstance(k, str):
                raise BadRequest(f"{tag}: messages[{i}] has a key that is not a string")
            if isinstance(v, str):
                chars += len(v)
            elif isinstance(v, list):
                chars += sum(len(s) for part in v if isinstance(part, dict)
                             for s in part.values() if isinstance(s, str))
            elif v is not None:
                raise BadRequest(f"{tag}: messages[{i}].{k[:64]} must be a string, a list of parts or null")
    return chars


def _prompt(m: Any) -> None:
    """What decides a prompt (a generation's, or one to count): ids, text, messages, tools, deadline."""
    t = m.TAG
    check_request(t, m.request_id, m.model, m.timeout_s)
    chars = len(m.prompt) if m.prompt is not None else 0
    if m.messages is not None:
        chars += _messages(t, m.messages)
    if chars > MAX_PROMPT_CHARS:
        raise BadRequest(f"{t}: the prompt has {chars} characters, more than {MAX_PROMPT_CHARS}")
    if m.tools is not None and len(m.tools) > MAX_TOOLS:
        raise BadRequest(f"{t}: {len(m.tools)} tools, more than {MAX_TOOLS}")
    if m.tool_choice not in _TOOL_CHOICES:
        raise BadRequest(f"{t}: field 'tool_choice' must be one of auto, none, required, function")
    check_template_kwargs(t, m.chat_template_kwargs)


# chat_template_kwargs: template variables, never arguments of apply_chat_template or of the
# tokenizer. Spread into that call they were its own parameters (`return_tensors` changed what the
# worker got back, `chat_template` replaced the model's template with the client's, `tokenize`,
# `tools`, `documents`...), and any other name overrides what the template reads beside the
# messages (the special tokens: `bos_token`, `eos_token`). So a closed list of the switches real
# templates read, each with its one value type (docs/security.md):
TEMPLATE_VARIABLES: dict[str, Any] = {
    "enable_thinking": bool,  # Qwen3, GLM-4.5 and later, SmolLM3, ERNIE 4.5, Hunyuan
    "thinking": bool,  # DeepSeek V3.1, Granite 3.2 / 3.3
    "reasoning_effort": ("low", "medium", "high"),  # gpt-oss
    "thinking_budget": int,  # Seed-OSS (a token count)
}
# Named in the refusal, so a client that sent one learns why: the renderer's and tokenizer's own.
RENDER_PARAMETERS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "add_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token",
})
_TYPE_WORDS = {bool: "a boolean", int: "an integer"}


def check_template_kwargs(tag: str, kwargs: Any) -> None:
    """BadRequest naming the key, unless every entry is an allowed template variable of its type."""
    if kwargs is None:
        return
    if type(kwargs) is not dict:
        raise BadRequest(f"{tag}: chat_template_kwargs must be a map of template variables",
                         param="chat_template_kwargs")
    allowed = ", ".join(TEMPLATE_VARIABLES)
    for key, value in kwargs.items():
        name = key[:64] if isinstance(key, str) else repr(key)[:64]
        rule = TEMPLATE_VARIABLES.get(key) if isinstance(key, str) else None
        if rule is None:
            what = "a parameter of the template renderer, not a template variable" \
                if key in RENDER_PARAMETERS else "not a template variable this server passes"
            raise BadRequest(f"{tag}: chat_template_kwargs {name!r} is {what} (allowed: {allowed})",
                             param=f"chat_template_kwargs.{name}")
        if isinstance(rule, tuple):
            ok, want = value in rule and type(value) is str, f"one of {', '.join(rule)}"
        else:
            ok, want = type(value) is rule, _TYPE_WORDS[rule]
            if ok and rule is int and not 0 <= value <= MAX_TOKENS:
                ok, want = False, f"an integer in [0, {MAX_TOKENS}]"
        if not ok:
            raise BadRequest(f"{tag}: chat_template_kwargs {name!r} must be {want}, got {repr(value)[:64]}",
                             param=f"chat_template_kwargs.{name}")


def _generate(m: Any) -> None:
    t = m.TAG
    _prompt(m)
    _number(t, "max_tokens", m.max_tokens, 1, MAX_TOKENS)
    _number(t, "temperature", m.temperature, 0.0, MAX_TEMPERATURE)
    _number(t, "top_p", m.top_p, 0.0, 1.0)
    _number(t, "seed", m.seed, 0, MAX_SEED)
    if len(m.stop) > MAX_STOP:
        raise BadRequest(f"{t}: {len(m.stop)} stop strings, more than {MAX_STOP}")
    for s in m.stop:
        _text(t, "stop", s, MAX_STOP_CHARS)
    _agent(m)


_TOOL_CHOICES = (None, "auto", "none", "required", "function")


def _agent(m: Any) -> None:
    t = m.TAG
    if m.tool_choice == "function" and not m.tool_name:
        raise BadRequest(f"{t}: tool_choice 'function' needs tool_name")
    if m.tool_choice in ("required", "function") and not m.tools:
        raise BadRequest(f"{t}: tool_choice {m.tool_choice!r} needs tools")
    if m.tool_name is not None and not any(
            isinstance(x, dict) and (x.get("function") or {}).get("name") == m.tool_name for x in m.tools or []):
        raise BadRequest(f"{t}: tool_name {m.tool_name[:64]!r} is not one of the tools")
    if m.response_format is not None and m.response_format.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"{t}: response_format.type must be text, json_object or json_schema")
    if m.response_format is not None and len(json.dumps(m.response_format, default=str)) > MAX_SCHEMA_CHARS:
        raise BadRequest(f"{t}: response_format is over {MAX_SCHEMA_CHARS} characters as JSON",
                         param="response_format")
    _number(t, "top_logprobs", m.top_logprobs, 0, MAX_TOP_LOGPROBS)
    _number(t, "top_k", m.top_k, 0, MAX_TOP_K)
    _number(t, "thinking_budget", m.thinking_budget, 0, MAX_TOKENS)
    if m.priority not in ("interactive", "batch"):
        raise BadRequest(f"{t}: priority must be interactive or batch", param="priority")


def _embed(m: Any) -> None:
    t = m.TAG
    check_request(t, m.request_id, m.model, m.timeout_s)
    if not 1 <= len(m.inputs) <= MAX_EMBED_INPUTS:
        raise BadRequest(f"{t}: inputs must hold 1..{MAX_EMBED_INPUTS} entries, got {len(m.inputs)}", param="inputs")
    strings = isinstance(m.inputs[0], str)
    each, whole = (MAX_EMBED_INPUT_CHARS, MAX_EMBED_TOTAL_CHARS) if strings else \
        (MAX_EMBED_INPUT_TOKENS, MAX_EMBED_TOTAL_TOKENS)
    unit = "characters" if strings else "tokens"
    for i, item in enumerate(m.inputs):
        if not 1 <= len(item) <= each:
            raise BadRequest(f"{t}: inputs[{i}] has {len(item)} {unit}, not within 1..{each}", param="inputs")
        if not strings and not all(0 <= tok <= MAX_TOKEN_ID for tok in item):
            raise BadRequest(f"{t}: inputs[{i}] holds a token id outside [0, {MAX_TOKEN_ID}]", param="inputs")
    total = sum(len(item) for item in m.inputs)
    if total > whole:
        raise BadRequest(f"{t}: the inputs have {total} {unit} together, more than {whole}", param="inputs")
    _number(t, "dimensions", m.dimensions, 1, MAX_EMBED_DIMS)


def _embeddings(m: Any) -> None:
    """A worker's vectors: whole float32 vectors of a bounded width, no more than a request may ask."""
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _number(m.TAG, "dims", m.dims, 1, MAX_EMBED_DIMS)
    _number(m.TAG, "prompt_tokens", m.prompt_tokens, 0, MAX_EMBED_TOTAL_CHARS)
    if len(m.data) % (4 * m.dims) or len(m.data) > 4 * m.dims * MAX_EMBED_INPUTS:
        raise BadRequest(f"{m.TAG}: data must be whole float32 vectors of {m.dims}, at most {MAX_EMBED_INPUTS}")


def _admin(m: Any) -> None:
    """The legacy AdminRequest and every typed admin request (each has some of these fields)."""
    t = m.TAG
    _text(t, "request_id", m.request_id, MAX_ID_CHARS)
    for name in ("op", "model", "revision", "target"):
        _text(t, name, getattr(m, name, None), MAX_NAME_CHARS)
    path = getattr(m, "path", None)
    _text(t, "path", path, MAX_PATH_CHARS)
    if path is not None and "\x00" in path:
        raise BadRequest(f"{t}: field 'path' contains a NUL byte")


def _ids(m: Any) -> None:
    """Status, cancel, load, unload, history: a request id and maybe a model id."""
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _text(m.TAG, "model", getattr(m, "model", None), MAX_NAME_CHARS)


def _hello(m: Any) -> None:
    t = m.TAG
    _text(t, "token", m.token, MAX_ID_CHARS)
    _text(t, "model_id", m.model_id, MAX_NAME_CHARS)
    _text(t, "revision", m.revision, MAX_NAME_CHARS)
    _number(t, "pid", m.pid, 1, (1 << 31) - 1)
    _number(t, "start_time", m.start_time, 0.0, float(1 << 40))
    if len(m.versions) > MAX_FIGURES:
        raise BadRequest(f"{t}: field 'versions' has {len(m.versions)} entries, more than {MAX_FIGURES}")
    if len(m.capabilities) > MAX_FIGURES or any(len(c) > MAX_NAME_CHARS for c in m.capabilities):
        raise BadRequest(f"{t}: field 'capabilities' must be at most {MAX_FIGURES} short names")


def _ready(m: Any) -> None:
    _text(m.TAG, "revision", m.revision, MAX_NAME_CHARS)
    _number(m.TAG, "load_s", m.load_s, 0.0, MAX_TIMEOUT_S)
    _figures(m.TAG, "memory", m.memory)


def _heartbeat(m: Any) -> None:
    _number(m.TAG, "progress", m.progress, 0, (1 << 63) - 1)
    _text(m.TAG, "phase", m.phase, MAX_NAME_CHARS)
    _figures(m.TAG, "memory", m.memory)
    _figures(m.TAG, "cache", m.cache)


def _chunk(m: Any) -> None:
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _number(m.TAG, "tokens", m.tokens, 0, MAX_TOKENS)


MAX_BATCH_ITEMS = 4096  # chunks in one batch step's message (a batch is far smaller)


def _chunks(m: Any) -> None:
    if len(m.items) > MAX_BATCH_ITEMS:
        raise BadRequest(f"{m.TAG}: {len(m.items)} items, more than {MAX_BATCH_ITEMS}")
    for item in m.items:
        if not (len(item) in (3, 4) and type(item[0]) is str and type(item[1]) is str and type(item[2]) is int
                and (len(item) == 3 or _extras_ok(item[3]))):
            raise BadRequest(f"{m.TAG}: every item must be [request_id, text, tokens] or with its extras")
        _text(m.TAG, "request_id", item[0], MAX_ID_CHARS)
        _number(m.TAG, "tokens", item[2], 0, MAX_TOKENS)


_EXTRAS = {"reasoning": str, "tool_calls": list, "logprobs": list}


def _extras_ok(extras: Any) -> bool:
    return isinstance(extras, dict) and all(type(extras.get(k)) is _EXTRAS.get(k) for k in extras)


def _final(m: Any) -> None:
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _text(m.TAG, "stop_sequence", m.stop_sequence, MAX_STOP_CHARS)
    _text(m.TAG, "finish_reason", m.finish_reason, MAX_NAME_CHARS)
    _figures(m.TAG, "usage", m.usage)
    # Timings are for people (a rate may come out as inf when a clock did not move): only types.
    if len(m.timings) > MAX_FIGURES or not all(isinstance(v, (int, float)) for v in m.timings.values()):
        raise BadRequest(f"{m.TAG}: field 'timings' must be a short map of numbers")


def _token_count(m: Any) -> None:
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _number(m.TAG, "prompt_tokens", m.prompt_tokens, 0, (1 << 63) - 1)


def _error(m: Any) -> None:
    _text(m.TAG, "request_id", m.request_id, MAX_ID_CHARS)
    _text(m.TAG, "code", m.code, MAX_NAME_CHARS)
    _text(m.TAG, "message", m.message, MAX_ERROR_CHARS)


# By wire tag. Only what a supervisor or a worker decodes from a peer; replies to a client are
# bounded by the frame size alone (a long generation's text is legitimate). A worker message out of
# these bounds is a protocol violation: the supervisor kills that worker. Widen a bound here
# before a worker starts sending more.
_CHECKS: dict[str, Callable[[Any], None]] = {
    "generate": _generate, "count_tokens": _prompt, "embed": _embed, "admin": _admin, "status": _ids, "cancel": _ids, "load": _ids, "unload": _ids,
    "history": _ids, "hello": _hello, "ready": _ready, "heartbeat": _heartbeat,
    # The typed admin requests (protocol.admin.REQUESTS), bounded like the AdminRequest they replace.
    "reload": _admin, "release": _admin, "rollback": _admin, "swap": _admin, "probe": _admin,
    "repair": _admin, "verify": _admin, "compat": _admin, "metrics": _admin, "cache_clear": _admin,
    # The peer link: the request a rank is sent is bounded as the generation it is.
    "rank_send": lambda m: _generate(m.request),
}
# Worker -> supervisor only: the client decodes the same tags from the supervisor, unbounded.
_FROM_WORKER: dict[str, Callable[[Any], None]] = {"chunk": _chunk, "chunks": _chunks, "final": _final,
                                                  "error": _error, "token_count": _token_count,
                                                  "embeddings": _embeddings}


def check(msg: Any, from_worker: bool = False) -> None:
    """Raise BadRequest when a decoded message is out of bounds (one with `bounds`, as protocol.rerank's
    are, checks itself, told whether a worker sent it)."""
    fn = _CHECKS.get(msg.TAG) or (_FROM_WORKER.get(msg.TAG) if from_worker else None)
    if fn is not None:
        fn(msg)
    elif hasattr(msg, "bounds"):
        msg.bounds(from_worker)
