"""The compatibility sweep: tiny random-weight snapshots of the architectures the operators care
about (as the installed mlx-lm names them), each probed through a real supervisor, printed as the
registry's matrix. Failures are evidence, recorded with their class, not hidden. Run:
`python bench/compat_sweep.py`."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.client import SupervisorClient  # noqa: E402
from tests.snapshots import smollm2_gguf_path, write_tiny_llama  # noqa: E402

ARCHS = ["llama", "qwen3", "qwen3_moe", "mistral3", "gemma3_text", "glm4_moe", "glm_moe_dsa", "deepseek_v3",
         "kimi_k25", "minimax"]
# One tiny shape for every family; keys an architecture does not know are ignored by from_dict.
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 2048, "tie_word_embeddings": True, "attention_bias": False,
    "n_routed_experts": 4, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "moe_intermediate_size": 64, "first_k_dense_replace": 1, "n_group": 1,
    "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "partial_rotary_factor": 0.5, "use_qk_norm": True, "rotary_dim": 8,
    "query_pre_attn_scalar": 16, "sliding_window": 64, "sliding_window_pattern": 2, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "rope_scaling": None, "moe_layer_freq": 1, "shared_intermediate_size": 64,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                        "original_max_position_embeddings": 2048},
}


def write_arch(arch: str, dest: Path, tokenizer_from: Path) -> str | None:
    """A random-weight snapshot of `arch`; None, or why mlx-lm could not build one."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
    except ImportError as exc:
        return f"not in this mlx-lm: {exc}"
    cfg = {**TINY, "model_type": arch}
    if arch in ("mistral3", "kimi_k25"):  # multimodal wrappers: the language model lives in text_config
        cfg["text_config"] = {**TINY, "model_type": "ministral3" if arch == "mistral3" else "deepseek_v3"}
    try:
        args = module.ModelArgs.from_dict(cfg)
        model = module.Model(args)
        weights = dict(tree_flatten(model.parameters()))
    except Exception as exc:  # any failure here is evidence about this architecture on this stack
        return f"cannot build a tiny {arch}: {type(exc).__name__}: {exc}"[:300]
    dest.mkdir(parents=True)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    known = {f.name for f in dataclasses.fields(args)} | {"model_type", "text_config"}
    (dest / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k in known}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, dest / f)
    return None


async def probe_all(state: Path, paths: dict[str, Path]) -> dict[str, dict]:
    async with SupervisorClient(state_dir=state, timeout_s=600) as client:
        out = {}
        for arch, path in paths.items():
            out[arch] = await client.probe(str(path))
        return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tiny = write_tiny_llama(tmp / "tiny-llama")
        built, unbuildable = {}, {}
        for arch in ARCHS:
            why = write_arch(arch, tmp / arch, tiny)
            if why is None:
                built[arch] = tmp / arch
            else:
                unbuildable[arch] = why
        # The test suite's own models, so the matrix has them beside the sweep's.
        built["llama (tests' tiny)"] = tiny
        from worker.gguf import import_gguf

        import_gguf(smollm2_gguf_path(), tmp / "smollm2")
        built["llama (SmolLM2)"] = tmp / "smollm2"
        cfg = tmp / "sweep.toml"
        cfg.write_text("[supervisor]\nload_timeout_s = 120.0\n")
        state = tmp / "state"
        sup = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(cfg), "--state-dir",
                                str(state)], cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            while not (state / "control.sock").exists():
                time.sleep(0.05)
            results = asyncio.run(probe_all(state, built))
            matrix = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(state), "compat",
                                     "--markdown"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
        finally:
            sup.send_signal(signal.SIGTERM)
            sup.wait(timeout=60)
    rows = []
    for arch in [*ARCHS, "llama (tests' tiny)", "llama (SmolLM2)"]:
        if arch in unbuildable:
            rows.append({"arch": arch, "outcome": "unbuilt", "detail": unbuildable[arch]})
            continue
        r = results[arch]
        err = r["last_error"]
        rows.append({"arch": arch, "outcome": "verified" if r["state"] == "READY" else "failed",
                     "detail": f"{err['code']}: {err['message']}"[:300] if err else
                     f"canary {r['canary']['tokens']} tokens",
                     "backend": (r.get("registry") or {}).get("backend")})
    print(json.dumps({"bench": "compat_sweep", "rows": rows}))
    print(f"{'architecture':<20} {'outcome':<9} detail")
    for row in rows:
        print(f"{row['arch']:<20} {row['outcome']:<9} {row['detail'][:110]}")
    print("\nlmxctl compat --markdown (the registry these probes wrote; rows are snapshot fingerprints):")
    print(matrix)


if __name__ == "__main__":
    main()
