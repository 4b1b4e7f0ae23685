"""Where a snapshot's config.json keeps its text model's fields (layers, heads, positions), read as
mlx-lm's model args read them, never importing mlx. A multimodal or wrapper config (kimi_k25,
mistral3, qwen3_5, gemma3, llama4...) nests them in `text_config`, and mlx-lm builds the language
model from that dict alone; a flat config has them at the top level. Every figure the supervisor
takes from a model's shape (memory.estimate, positions.position_limit) goes through `text_fields`,
so a nested config never costs what its flat twin does not."""

from __future__ import annotations

from typing import Any

# What mlx-lm's wrappers fill into a text_config that leaves it out, before the text model reads it
# (mlx_lm/models/gemma3.py, gemma4.py, pixtral.py: ModelArgs.__post_init__).
_WRAPPER_DEFAULTS: dict[str, dict[str, int]] = {
    "gemma3": {"num_attention_heads": 8, "num_key_value_heads": 4},
    "gemma4": {"num_attention_heads": 8, "num_key_value_heads": 1},
    "pixtral": {"num_attention_heads": 32},
}


def text_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: `text_config` when there is one, over what its wrapper fills in,
    over the top level (a field only the top level names still counts, as mlx-lm's flattening
    readers take it: muse_glimmer's from_dict); the config itself when flat."""
    nested = cfg.get("text_config")
    if not isinstance(nested, dict):
        return cfg
    return {**cfg, **_WRAPPER_DEFAULTS.get(str(cfg.get("model_type")), {}), **nested}
