"""Constrained decoding (worker/constrain.py) in-process on a tiny random llama: random weights never
write JSON or tool calls by themselves, so every valid output here is the grammar's doing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.generate import BatchGenerator, generate_step  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from tests.snapshots import write_tiny_llama  # noqa: E402
from worker import constrain  # noqa: E402

# Kimi K2's and Mistral's markers are special tokens in their vocabs; adding them to the tiny one
# tests that path, while Hermes' <tool_call> (absent here) tests markers forced as text.
EXTRA_SPECIALS = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                  "<|tool_call_argument_begin|>", "<|tool_call_end|>", "[TOOL_CALLS]", "[ARGS]"]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["query", "exact"],
          "properties": {"query": {"type": "string", "maxLength": 16}, "exact": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
PROMPT = "The quick brown fox jumps over the lazy dog."
RUNS = [(0.0, 0), (1.0, 1), (1.0, 2)]  # (temperature, seed): greedy and two sampled


def _add_specials(snapshot: Path) -> Path:
    """Append EXTRA_SPECIALS to the tokenizer and matching rows to the (tied) embedding."""
    tok_path, cfg_path = snapshot / "tokenizer.json", snapshot / "config.json"
    tok, cfg = json.loads(tok_path.read_text()), json.loads(cfg_path.read_text())
    first = cfg["vocab_size"]
    tok["added_tokens"] += [{"id": first + i, "content": t, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, t in enumerate(EXTRA_SPECIALS)]
    cfg["vocab_size"] = first + len(EXTRA_SPECIALS)
    weights = mx.load(str(snapshot / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    extra = mx.random.normal((len(EXTRA_SPECIALS), embed.shape[1]), key=mx.random.key(7)) * 0.3
    weights["model.embed_tokens.weight"] = mx.concatenate([embed, extra.astype(embed.dtype)])
    mx.save_safetensors(str(snapshot / "model.safetensors"), weights, metadata={"format": "mlx"})
    tok_path.write_text(json.dumps(tok))
    cfg_path.write_text(json.dumps(cfg))
    return snapshot


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    snapshot = write_tiny_llama(tmp_path_factory.mktemp("constrain") / "tiny", dtype="float32", scale=0.3)
    model, tokenizer = mlx_lm.load(str(_add_specials(snapshot)))
    return model, tokenizer


def _generate(loaded, spec: dict | None, temperature: float = 0.0, seed: int = 0,
              max_tokens: int = 128, tokenizer=None) -> tuple[str, list[int], object]:
    model, tok = loaded
    mx.random.seed(seed)
    proc = constrain.make_processor(tokenizer or tok, spec) if spec else None
    out: list[int] = []
    for token, _ in generate_step(mx.array(tok.encode(PROMPT)), model, max_tokens=max_tokens,
                                  sampler=make_sampler(temp=temperature),
                                  logits_processors=[proc] if proc else None):
        if token in tok.eos_token_ids:
            break
        out.append(token)
    return tok.decode(out), out, proc


def _validate(value, schema: dict, path: str = "$") -> None:
    """The JSON Schema subset these tests use; raises AssertionError naming the path."""
    kinds = {"object": dict, "string": str, "boolean": bool, "array": list}
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
    elif kind in kinds:
        assert isinstance(value, kinds[kind]), f"{path}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r}"
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], path
    if "minimum" in schema:
        assert value >= schema["minimum"], path
    if "maximum" in schema:
        assert value <= schema["maximum"], path
    if kind == "object":
        assert set(schema.get("required", ())) <= set(value), f"{path}: missing keys in {value!r}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys in {value!r}"
        for key, sub in props.items():
            if key in value:
                _validate(value[key], sub, f"{path}.{key}")


def _json_schema_spec(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature,seed", RUNS)
def test_json_schema_output_parses_and_validates(loaded, temperature, seed):
    text, tokens, proc = _generate(loaded, _json_schema_spec(WEATHER), temperature, seed)
    _validate(json.loads(text), WEATHER)
    assert proc.complete and proc.error is None
    assert len(tokens) < 128  # ended by EOS, which is all the grammar allowed once complete


def test_unconstrained_output_is_not_json(loaded):
    text, _, _ = _generate(loaded, None, max_tokens=32)
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("temperature,seed", RUNS)
def test_json_object_output_is_an_object(loaded, temperature, seed):
    text, _, proc = _generate(loaded, {"type": "json_object"}, temperature, seed, max_tokens=256)
    if proc.complete:
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens inside a long string or nesting: still the start of an object
        assert text.startswith("{") and proc.error is None


def _parse_between(text: str, fmt: str):
    """What mlx-lm's server hands the parser: the text between the format's markers."""
    module = __import__(f"mlx_lm.tool_parsers.{fmt}", fromlist=["parse_tool_call"])
    assert text.startswith(module.tool_call_start), text
    body = text[len(module.tool_call_start):]
    if module.tool_call_end:
        assert body.endswith(module.tool_call_end), text
        body = body[: -len(module.tool_call_end)]
    call = module.parse_tool_call(body, TOOLS)
    return call[0] if isinstance(call, list) else call


@pytest.mark.parametrize("fmt", ["json_tools", "kimi_k2", "mistral"])
@pytest.mark.parametrize("name", ["get_weather", None])
@pytest.mark.parametrize("temperature,seed", RUNS)
def test_forced_tool_call_parses_back(loaded, fmt, name, temperature, seed):
    spec = {"type": "tool_call", "tools": TOOLS, "name": name, "parser": fmt}
    text, tokens, proc = _generate(loaded, spec, temperature, seed)
    call = _parse_between(text, fmt)
    assert proc.complete and call["name"] == (name or call["name"]) and call["name"] in SCHEMAS
    _validate(call["arguments"], SCHEMAS[call["name"]])
    # The streaming detokenizer the worker uses gives the same text, markers included.
    detok = loaded[1].detokenizer
    detok.reset()
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_special_markers_are_forced_as_their_tokens(loaded):
    tok = loaded[1]
    text, tokens, _ = _generate(loaded, {"type": "tool_call", "tools": TOOLS, "name": "search",
                                         "parser": "kimi_k2"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in EXTRA_SPECIALS[:5]}
    assert tokens[:2] == [ids["<|tool_calls_section_begin|>"], ids["<|tool_call_begin|>"]]
    assert tokens[-2:] == [ids["<|tool_call_end|>"], ids["<|tool_calls_section_end|>"]]
    assert tok.decode(tokens[:1]) == "<|tool_calls_section_begin|>"


def test_text_markers_decode_back_to_the_marker(loaded):
    text, tokens, _ = _generate(loaded, {"type": "tool_call", "tools": TOOLS, "name": None,
                                         "parser": "json_tools"})
    tok = loaded[1]
    prefix = next(i for i in range(1, len(tokens) + 1) if tok.decode(tokens[:i]).startswith("<tool_call>"))
    assert tok.decode(tokens[:prefix]).startswith("<tool_call>") and text.rstrip().endswith("</tool_call>")


def test_mistral_without_args_token_writes_a_json_list(loaded, tmp_path):
    # A tokenizer of the same vocab without the special tokens: the older [TOOL_CALLS][{...}] form,
    # and a model vocab wider than the tokenizer's (the extra ids must be masked out).
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=None,
                                    tokenizer_file=str(write_tiny_llama(tmp_path / "plain") / "tokenizer.json"),
                                    eos_token="<|im_end|>")
    spec = {"type": "tool_call", "tools": TOOLS, "name": "search", "parser": "mistral"}
    text, _, _ = _generate(loaded, spec, tokenizer=plain)
    assert text.startswith("[TOOL_CALLS][{")
    call = _parse_between(text, "mistral")
    assert call["name"] == "search"
    _validate(call["arguments"], SEARCH)


def test_batch_mixes_a_constrained_and_a_free_request(loaded):
    model, tok = loaded
    proc = constrain.make_processor(tok, _json_schema_spec(SEARCH))
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tok.eos_token_ids], max_tokens=96)
    prompt = tok.encode(PROMPT)
    free_uid, json_uid = gen.insert([prompt, prompt], [48, 96], logits_processors=[[], [proc]])
    out: dict[int, list[int]] = {free_uid: [], json_uid: []}
    finished: set[int] = set()
    while len(finished) < 2:
        for r in gen.next_generated():
            if r.token not in tok.eos_token_ids:
                out[r.uid].append(r.token)
            if r.finish_reason is not None:
                finished.add(r.uid)
    gen.close()
    _validate(json.loads(tok.decode(out[json_uid])), SEARCH)
    assert proc.complete
    assert len(out[free_uid]) == 48  # the free one ran to max_tokens, unmasked


def test_moved_from_generate_step_into_a_batch(loaded):
    """The worker's solo -> batch move: generate_step has masked one step ahead; after rebase() the
    batch continues the same matcher from the right position."""
    model, tok = loaded
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    proc = constrain.make_processor(tok, _json_schema_spec(WEATHER))
    prompt, cache = tok.encode(PROMPT), make_prompt_cache(model)
    # A prefix-cache hit: generate_step sees only the rest, so its contexts are shorter than the batch's.
    mx.eval(model(mx.array(prompt[:2])[None], cache=cache))
    steps = generate_step(mx.array(prompt[2:]), model, prompt_cache=cache, logits_processors=[proc])
    generated = [next(steps)[0] for _ in range(5)]
    steps.close()
    trim_prompt_cache(cache, 1)
    proc.rebase()
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tok.eos_token_ids], max_tokens=128)
    (uid,) = gen.insert([generated[-1:]], [123], caches=[cache], all_tokens=[prompt + generated[:-1]],
                        logits_processors=[[proc]])
    while True:
        (r,) = gen.next_generated()
        if r.token in tok.eos_token_ids or r.finish_reason is not None:
            break
        generated.append(r.token)
    gen.close()
    _validate(json.loads(tok.decode(generated)), WEATHER)


@pytest.mark.parametrize("fmt", ["qwen3_coder", "glm47", "minimax_m2", "pythonic", None])
def test_formats_without_json_arguments_are_refused(loaded, fmt):
    with pytest.raises(constrain.Unsupported) as err:
        constrain.make_processor(loaded[1], {"type": "tool_call", "tools": TOOLS, "name": None, "parser": fmt})
    assert err.value.format == fmt and isinstance(err.value, ValueError)


@pytest.mark.parametrize("spec", [
    {"type": "grammar"},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}, "strict": True}},
    {"type": "tool_call", "tools": TOOLS, "name": "missing", "parser": "json_tools"},
    {"type": "tool_call", "tools": [], "name": None, "parser": "json_tools"},
    {"type": "tool_call", "tools": [{"type": "function"}], "name": None, "parser": "json_tools"},
    {"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nonsense"}, "strict": True}}], "name": None, "parser": "kimi_k2"},
    "json",
])
def test_malformed_constraints_are_constraint_errors(loaded, spec):
    with pytest.raises(constrain.ConstraintError):
        constrain.make_processor(loaded[1], spec)


def test_the_llguidance_tokenizer_is_built_once_per_tokenizer(loaded):
    assert constrain.constrainer_for(loaded[1]) is constrain.constrainer_for(loaded[1])
