"""Per-token cost of constrained decoding (worker/constrain.py): decode time per token with
mlx_lm.generate_step on the tiny random llama, plain vs json_schema vs a forced tool call
(json_tools), and plain decoding with the worker's logprobs (top 5), 128 tokens or until the grammar
ends, several runs, medians. Pass a snapshot path to
measure another model (e.g. an imported SmolLM2: a 49k vocab makes the mask dearer than the tiny 512).
Prints one JSON line and a table."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = 7
MAX_TOKENS = 128
PROMPT = "The quick brown fox jumps over the lazy dog."
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string", "maxLength": 16}},
             "required": ["query"], "additionalProperties": False}}}]
CASES = {
    "plain": None,
    "json_schema": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}},
    "tool_call": {"type": "tool_call", "tools": TOOLS, "name": None, "parser": "json_tools"},
    # Not a constraint: the worker's own per-token logprobs (chosen token + the top 5), as served.
    "logprobs_top5": {"logprobs": 5},
}


def one_run(model, tok, spec: dict | None, seed: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from worker import constrain
    from worker.batch import token_logprobs

    top = (spec or {}).get("logprobs")
    if top:
        spec = None
    mx.random.seed(seed)
    start = time.perf_counter()
    proc = constrain.make_processor(tok, spec) if spec else None
    build_s = time.perf_counter() - start
    stamps = []
    for token, logprobs in generate_step(mx.array(tok.encode(PROMPT)), model, max_tokens=MAX_TOKENS,
                                         sampler=make_sampler(temp=1.0), logits_processors=[proc] if proc else None):
        if top:
            token_logprobs(tok, token, logprobs, top)
        stamps.append(time.perf_counter())
        if proc is not None and token in tok.eos_token_ids:
            break
    # From the first token on: prefill is the same with or without a constraint.
    per_token_s = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return {"per_token_s": per_token_s, "tokens": len(stamps), "build_s": build_s}


def measure(model, tok) -> dict[str, dict]:
    results = {}
    for name, spec in CASES.items():
        one_run(model, tok, spec, seed=99)  # warm-up: kernels, the cached llguidance tokenizer
        runs = [one_run(model, tok, spec, seed) for seed in range(RUNS)]
        results[name] = {
            "per_token_ms": round(statistics.median(r["per_token_s"] for r in runs) * 1e3, 4),
            "tokens_median": statistics.median(r["tokens"] for r in runs),
            "processor_build_ms": round(statistics.median(r["build_s"] for r in runs) * 1e3, 3),
        }
    plain = results["plain"]["per_token_ms"]
    for row in results.values():
        row["overhead_ms"] = round(row["per_token_ms"] - plain, 4)
        row["ratio"] = round(row["per_token_ms"] / plain, 3)
    return results


def main() -> int:
    import mlx.core as mx
    import mlx_lm

    from tests.snapshots import write_tiny_llama
    from worker import constrain

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_llama(Path(tmp) / "tiny", dtype="float32",
                                                                             scale=0.3)
        model, tok = mlx_lm.load(str(path))
        start = time.perf_counter()
        constrain.constrainer_for(tok)
        tokenizer_build_ms = round((time.perf_counter() - start) * 1e3, 2)
        results = measure(model, tok)
    print(json.dumps({"bench": "constrain_cost", "model": "tiny" if len(sys.argv) < 2 else str(path),
                      "vocab": tok.vocab_size, "backend": str(mx.default_device()), "runs": RUNS,
                      "max_tokens": MAX_TOKENS, "llguidance_tokenizer_build_ms": tokenizer_build_ms,
                      "cases": results}))
    print(f"\n{'case':<14}{'ms/token':>10}{'overhead':>10}{'ratio':>8}{'tokens':>8}{'build ms':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['per_token_ms']:>10.3f}{r['overhead_ms']:>10.3f}{r['ratio']:>8.2f}"
              f"{r['tokens_median']:>8}{r['processor_build_ms']:>10.2f}")
    print(f"llguidance tokenizer build (once per worker): {tokenizer_build_ms} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
