"""A config that nests its text model in `text_config` (kimi_k25, mistral3, qwen3_5, gemma3) costs what
its flat twin costs: the memory estimate, the default prefix-cache budget a worker is given and the
position limit all read the text model's fields where mlx-lm's model args read them
(supervisor.admission.textconfig), so Kimi K2.5 keeps its prefix cache on by default."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from supervisor.admission import kvcache
from supervisor.admission.memory import estimate
from supervisor.admission.positions import position_limit
from supervisor.admission.textconfig import text_fields
from supervisor.config import ModelConfig

pytestmark = pytest.mark.timeout(60)

# The text models of real mlx-lm architectures, shaped as their published configs are (sizes shrunk
# where they do not matter): (wrapper model_type, its text model's config).
NESTED = {
    "kimi_k25": {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61,
                 "num_attention_heads": 64, "num_key_value_heads": 64, "hidden_size": 7168,
                 "intermediate_size": 18432, "vocab_size": 163840, "max_position_embeddings": 262144,
                 "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                 "v_head_dim": 128, "n_routed_experts": 384, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 2048, "rms_norm_eps": 1e-5},
    "mistral3": {"model_type": "mistral", "num_hidden_layers": 40, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120, "intermediate_size": 32768,
                 "vocab_size": 131072, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5},
    "qwen3_5": {"model_type": "qwen3_5_text", "num_hidden_layers": 32, "num_attention_heads": 16,
                "num_key_value_heads": 4, "head_dim": 256, "hidden_size": 4096, "intermediate_size": 12288,
                "vocab_size": 248320, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6},
}
# A vision tower beside the text model, as a multimodal config has: none of its figures is the text model's.
VISION = {"num_hidden_layers": 27, "num_attention_heads": 16, "hidden_size": 1152, "max_position_embeddings": 729}


def _snapshot(root: Path, name: str, cfg: dict) -> str:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _pair(tmp_path: Path, arch: str) -> tuple[str, str]:
    text = NESTED[arch]
    nested = {"model_type": arch, "architectures": ["ForConditionalGeneration"], "text_config": text,
              "vision_config": VISION}
    return _snapshot(tmp_path, "nested", nested), _snapshot(tmp_path, "flat", dict(text))


@pytest.mark.parametrize("arch", sorted(NESTED))
def test_a_nested_text_config_gets_the_kv_and_prefix_cache_budget_of_its_flat_twin(tmp_path: Path, arch: str) -> None:
    nested, flat = _pair(tmp_path, arch)
    kv = estimate(flat, 8192)["kv_cache"]
    assert kv > 0
    assert estimate(nested, 8192)["kv_cache"] == kv
    assert estimate(nested, 8192)["total"] == estimate(flat, 8192)["total"]
    # What the worker is told to keep for its prefix cache by default (auto): on, and the flat figure.
    fields = [kvcache.init_fields(ModelConfig(id="m", path=p, context_tokens=8192), None) for p in (nested, flat)]
    assert fields[0]["prefix_cache_bytes"] == fields[1]["prefix_cache_bytes"] == kvcache.AUTO_CONTEXTS * kv
    assert position_limit(nested) == position_limit(flat) == NESTED[arch]["max_position_embeddings"]


def test_kimi_k25s_default_prefix_cache_is_its_kv_figure(tmp_path: Path) -> None:
    nested, _ = _pair(tmp_path, "kimi_k25")
    # MLA: 61 layers x (the 512-wide latent + the 64-wide rope key) x float16, per token; not
    # 64 heads' keys and values (25 times as much).
    assert estimate(nested, 1)["kv_cache"] == 61 * (512 + 64) * 2
    assert kvcache.budget_bytes(ModelConfig(id="kimi", path=nested, context_tokens=4096)) == \
        kvcache.AUTO_CONTEXTS * 4096 * 61 * (512 + 64) * 2


TINY_TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}
TINY_MLA = {**TINY_TEXT, "model_type": "kimi_k2", "num_key_value_heads": 4, "moe_intermediate_size": 32,
            "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16}


@pytest.mark.parametrize("cfg", [
    {**TINY_TEXT, "model_type": "llama"},
    {"model_type": "mistral3", "text_config": {**TINY_TEXT, "model_type": "mistral"}},
    TINY_MLA,
    {"model_type": "kimi_k25", "text_config": TINY_MLA},
], ids=["llama", "mistral3", "kimi_k2", "kimi_k25"])
def test_the_kv_estimate_is_what_mlx_lms_cache_holds(tmp_path: Path, cfg: dict) -> None:
    """The model mlx-lm builds from the config, in float16, after a 256-token prefill (one step of
    its KV cache's allocation): its cache's bytes are the estimate's, nested or flat, MLA or not."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(json.loads(json.dumps(cfg))))
    model.set_dtype(mx.float16)
    cache = make_prompt_cache(model)
    model(mx.zeros((1, 256), dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    assert estimate(_snapshot(tmp_path, "m", cfg), 256)["kv_cache"] == sum(c.nbytes for c in cache) > 0


def _mlx_lm_text_args(cfg: dict) -> dict:
    """The fields mlx-lm builds this config's language model from: its model args' text_config (a
    dict, or the text model's args), after the wrapper's own defaults are filled in."""
    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    text = module.ModelArgs.from_dict(json.loads(json.dumps(cfg))).text_config
    return text if isinstance(text, dict) else vars(text)


@pytest.mark.parametrize("arch", [*sorted(NESTED), "gemma3"])
def test_the_fields_are_the_ones_mlx_lm_builds_the_text_model_from(arch: str) -> None:
    text = NESTED.get(arch) or {"model_type": "gemma3_text", "num_hidden_layers": 34, "hidden_size": 2560,
                                "head_dim": 256, "max_position_embeddings": 131072}  # gemma-3-4b: no heads named
    cfg = {"model_type": arch, "text_config": dict(text), "vision_config": VISION}
    ours, theirs = text_fields(cfg), _mlx_lm_text_args(cfg)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                "max_position_embeddings"):
        if theirs.get(key) is not None:
            assert ours.get(key) == theirs[key], key


def test_a_flat_config_and_a_position_only_on_top_read_as_before(tmp_path: Path) -> None:
    flat = {"model_type": "llama", "num_hidden_layers": 2, "max_position_embeddings": 2048}
    assert text_fields(flat) is flat
    top_only = {"model_type": "mistral3", "max_position_embeddings": 4096, "text_config": {"num_hidden_layers": 2}}
    assert text_fields(top_only)["max_position_embeddings"] == 4096
    assert position_limit(_snapshot(tmp_path, "top", top_only)) == 4096
    assert text_fields({"text_config": "not a dict", "num_hidden_layers": 3})["num_hidden_layers"] == 3
