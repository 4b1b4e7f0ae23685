"""Structured output by constrained decoding: a request's constraint as an mlx-lm logits processor.

Engine: llguidance, not xgrammar. llguidance is one abi3 Rust wheel with no torch; it computes each
token mask on the fly from JSON Schema or Lark (no per-schema compile step that a request would wait
on), refers to special tokens by id (tool-call markers such as Kimi's `<|tool_call_begin|>`), and its
numpy bitmask helpers run anywhere. xgrammar pulls torch on Linux (gigabytes, for a daemon that
never uses it) and compiles each grammar before the first token. The mask is applied with plain mx
ops, never llguidance's Metal kernel, so the same code runs on MLX's CPU and Metal backends.

Spec shapes (the wire's plain dicts):
  {"type": "json_object"}                                       any JSON object
  {"type": "json_schema", "json_schema": {"name": .., "schema": {..}, "strict": bool}}
  {"type": "tool_call", "tools": [OpenAI function tools], "name": "fn" | None, "parser": "json_tools"}
      exactly one call, in the model's own format, that mlx_lm.tool_parsers.<parser>.parse_tool_call
      reads back; name None lets the model pick any of the tools (tool_choice "required").

Tool-call formats (the mlx_lm.tool_parsers module the tokenizer wrapper inferred):
  json_tools  (Hermes, Qwen2.5/3)  `<tool_call>` `{"name": "fn", "arguments": {..}}` `</tool_call>`;
              one optional newline inside each marker, as the templates render it.
  kimi_k2     `<|tool_calls_section_begin|><|tool_call_begin|>functions.fn:0<|tool_call_argument_begin|>`
              `{..}<|tool_call_end|><|tool_calls_section_end|>`.
  mistral     `[TOOL_CALLS]fn[ARGS]{..}` when the vocab has an `[ARGS]` token (v11+ tokenizers),
              else `[TOOL_CALLS][{"name": "fn", "arguments": {..}}]`; the format has no end marker,
              so the call ends the generation.
  Every other parser raises Unsupported (the worker answers 400). qwen3_coder, glm47 and minimax_m2
  write arguments as XML-like key/value tags whose values are typed only by the parser's reading of
  the schema, so a JSON-schema grammar cannot describe them faithfully; tool_choice "auto" (parse
  whatever the model writes) still works for them, unconstrained.

Markers that are special tokens in the vocab are forced as those tokens (the model's own spelling);
the others are forced as text. JSON is compact-with-spaces (`", "`, `": "`, as json.dumps and the
templates' tojson write it): flexible whitespace lets weak models emit newlines forever. Once the
grammar is complete only EOS may follow.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

# Defaults only: a schema's own "x-guidance" key overrides them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ENFORCED_FORMATS = ("json_tools", "kimi_k2", "mistral")
_XML_FORMATS = ("qwen3_coder", "glm47", "minimax_m2")


class ConstraintError(ValueError):
    """The request's constraint is malformed or its schema cannot be compiled (a 400, not a crash)."""


class Unsupported(ConstraintError):
    """The constraint is well formed but this model's tool-call format cannot be enforced."""

    def __init__(self, fmt: str | None, why: str):
        super().__init__(f"tool-call format {fmt!r} cannot be enforced: {why}")
        self.format = fmt


class ConstrainedLogits:
    """One request's logits processor: `processor(tokens, logits) -> logits` as mlx-lm calls it, in
    generate_step and in BatchGenerator (one list per sequence). Owns its matcher; never reuse it.

    Each call after the first finds the context one sampled token longer. A request moved from
    generate_step into a batch is called again at the position generate_step already masked (it
    runs one step ahead) with a context of another length: call rebase() when moving it. Not for
    speculative decoding, which calls processors on draft tokens it may then reject."""

    def __init__(self, matcher: llguidance.LLMatcher, ll_tokenizer: llguidance.LLTokenizer,
                 eos_ids: list[int]):
        self._matcher = matcher
        self._bitmask = llnp.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        self._eos_ids = eos_ids
        self._context_len: int | None = None
        self.error: str | None = None

    @property
    def complete(self) -> bool:
        """The output so far satisfies the grammar (False when max_tokens cut it short)."""
        return self.error is None and (self._matcher.is_accepting() or self._matcher.is_stopped())

    def rebase(self) -> None:
        """The next call's context is a new one whose tokens this processor has consumed already."""
        self._context_len = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Start the forward pass now so it runs while the CPU computes the mask.
        mx.async_eval(logits)
        self._consume(tokens)
        return mx.where(self._allowed(logits.shape[-1]), logits, -mx.inf)

    def _consume(self, tokens: mx.array) -> None:
        # `tokens` is the whole context (prompt, or only its last token in a batch without
        # all_tokens); the first call fixes that base and every later call adds the one sampled token.
        if self._context_len is None:
            self._context_len = tokens.size
            return
        new = tokens[self._context_len:].tolist() if tokens.size > self._context_len else []
        self._context_len = tokens.size
        if self.error is not None or self._matcher.is_stopped():
            return
        if not self._matcher.consume_tokens(new):
            # Only a sampler that ignores -inf gets here; end the output rather than the batch.
            self.error = self._matcher.get_error() or f"token(s) {new} rejected by the grammar"

    def _allowed(self, width: int) -> mx.array:
        if self.error is not None or self._matcher.is_stopped():
            allowed = np.zeros(width, dtype=bool)
            allowed[[i for i in self._eos_ids if i < width]] = True
            return mx.array(allowed)
        llnp.fill_next_token_bitmask(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").view(bool)
        # A model's vocab may be padded past the tokenizer's, or (rarely) shorter.
        if bits.size < width:
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        return mx.array(bits[:width])


class Constrainer:
    """One model's llguidance tokenizer (built once per worker: it walks the whole vocab) and the
    factory for its requests' processors."""

    def __init__(self, tokenizer: Any):
        """`tokenizer`: mlx-lm's TokenizerWrapper (its EOS set is the model's), or a HF fast tokenizer."""
        if isinstance(tokenizer, TokenizerWrapper):
            hf, eos = tokenizer._tokenizer, sorted(tokenizer.eos_token_ids)
        else:
            hf, eos = tokenizer, [tokenizer.eos_token_id]
        self.eos_ids = eos
        self.ll_tokenizer = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        self._special = {t.content: i for i, t in hf.added_tokens_decoder.items() if t.special}

    def processor(self, spec: dict) -> ConstrainedLogits:
        """A fresh processor for one request; ConstraintError/Unsupported when it cannot be built."""
        grammar = self.grammar(spec)
        try:
            matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"the constraint does not compile: {exc}") from exc
        if matcher.is_error():
            raise ConstraintError(f"the constraint does not compile: {matcher.get_error()}")
        return ConstrainedLogits(matcher, self.ll_tokenizer, self.eos_ids)

    def grammar(self, spec: dict) -> str:
        """The llguidance grammar (JSON text) for a spec."""
        if not isinstance(spec, dict):
            raise ConstraintError("a constraint must be a mapping with a 'type'")
        kind = spec.get("type")
        if kind == "json_object":
            return _schema_grammar({"type": "object"}, lenient=False)
        if kind == "json_schema":
            body = spec.get("json_schema")
            schema = body.get("schema") if isinstance(body, dict) else None
            if not isinstance(schema, dict):
                raise ConstraintError("json_schema.schema must be a JSON Schema object")
            # Non-strict requests get the keywords llguidance implements, the rest ignored.
            return _schema_grammar(schema, lenient=not body.get("strict", False))
        if kind == "tool_call":
            return self._tool_grammar(spec)
        raise ConstraintError(f"unknown constraint type {kind!r}")

    def _tool_grammar(self, spec: dict) -> str:
        fmt = spec.get("parser")
        if fmt in _XML_FORMATS:
            raise Unsupported(fmt, "its arguments are XML-like tags, not JSON; use tool_choice 'auto'")
        builder = {"json_tools": _json_tools_lark, "kimi_k2": _kimi_k2_lark,
                   "mistral": _mistral_lark}.get(fmt)
        if builder is None:
            raise Unsupported(fmt, f"enforced formats are {', '.join(ENFORCED_FORMATS)}")
        lark = builder(_tool_schemas(spec.get("tools"), spec.get("name")), self._lit)
        return llguidance.LLMatcher.grammar_from_lark(lark)

    def _lit(self, text: str) -> str:
        """A Lark terminal for marker text: the special token itself when the vocab has one."""
        if text in self._special:
            return f"<[{self._special[text]}]>"
        return json.dumps(text)


_constrainers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_constrainers_lock = threading.Lock()


def constrainer_for(tokenizer: Any) -> Constrainer:
    """The Constrainer of a loaded model's TokenizerWrapper, built on first use and kept with it."""
    with _constrainers_lock:
        found = _constrainers.get(tokenizer)
        if found is None:
            found = _constrainers[tokenizer] = Constrainer(tokenizer)
        return found


def make_processor(tokenizer: Any, spec: dict) -> ConstrainedLogits:
    """The factory the worker calls per request: `logits_processors=[make_processor(tok, spec)]`."""
    return constrainer_for(tokenizer).processor(spec)


def _with_options(schema: dict, lenient: bool) -> dict:
    schema = copy.deepcopy(schema)
    options = dict(JSON_OPTIONS, lenient=lenient)
    options.update(schema.get("x-guidance") or {})
    schema["x-guidance"] = options
    return schema


def _schema_grammar(schema: dict, lenient: bool) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema, lenient))
    except ValueError as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from exc


def _tool_schemas(tools: Any, name: str | None) -> list[tuple[str, dict, bool]]:
    """(name, arguments schema, strict) of each callable tool, in the request's order."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError("a forced tool call needs a non-empty 'tools' list")
    calls = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConstraintError("every tool must be {'type': 'function', 'function': {'name': ...}}")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise ConstraintError(f"tool {fn['name']!r}: parameters must be a JSON Schema object")
        calls.append((fn["name"], params, bool(fn.get("strict", False))))
    if name is not None:
        calls = [c for c in calls if c[0] == name]
        if not calls:
            raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools")
    return calls


def _json_rule(schema: dict, strict: bool) -> str:
    return "%json " + json.dumps(_with_options(schema, lenient=not strict))


def _named_call_schema(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _lark(before: str, alternatives: list[str], after: str = "") -> str:
    """`start: before (one of the alternatives) after`, one rule per alternative."""
    rules = [f"call_{i}: {alt}" for i, alt in enumerate(alternatives)]
    choice = " | ".join(f"call_{i}" for i in range(len(alternatives)))
    return "\n".join(["%llguidance {}", f"start: {before} ({choice}) {after}", *rules]) + "\n"


def _json_tools_lark(calls: list[tuple[str, dict, bool]], lit) -> str:
    alts = [_json_rule(_named_call_schema(name, params), strict) for name, params, strict in calls]
    return _lark(f'{lit("<tool_call>")} "\\n"?', alts, f'"\\n"? {lit("</tool_call>")}')


def _kimi_k2_lark(calls: list[tuple[str, dict, bool]], lit) -> str:
    # The parser takes the name from `functions.NAME:IDX`; one call per output, so IDX is 0.
    alts = [f'{json.dumps(f"functions.{name}:0")} {lit("<|tool_call_argument_begin|>")} '
            f"{_json_rule(params, strict)}" for name, params, strict in calls]
    return _lark(f'{lit("<|tool_calls_section_begin|>")} {lit("<|tool_call_begin|>")}', alts,
                 f'{lit("<|tool_call_end|>")} {lit("<|tool_calls_section_end|>")}')


def _mistral_lark(calls: list[tuple[str, dict, bool]], lit) -> str:
    if not lit("[ARGS]").startswith("<["):
        alts = [_json_rule(_named_call_schema(name, params), strict) for name, params, strict in calls]
        return _lark(f'{lit("[TOOL_CALLS]")} "["', alts, '"]"')
    for name, _, _ in calls:
        # mlx-lm's header regex reads a name as [\w-]+; any other name would not parse back.
        if not re.fullmatch(r"[\w-]+", name):
            raise Unsupported("mistral", f"tool name {name!r} is not made of [A-Za-z0-9_-]")
    alts = [f'{json.dumps(name)} {lit("[ARGS]")} {_json_rule(params, strict)}'
            for name, params, strict in calls]
    return _lark(lit("[TOOL_CALLS]"), alts)
