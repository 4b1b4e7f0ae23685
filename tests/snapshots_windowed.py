"""Tiny random snapshots of sliding-window architectures (mlx-lm's RotatingKVCache beside a KVCache):
gemma3_text and gpt_oss, with a window of a few tokens, so a short prompt wraps it already. The
same BPE tokenizer, template and special tokens as tests.snapshots' tiny llama; float32 weights at
a scale where greedy output follows the context (it does not settle on one repeated token), so a
token fed twice changes what comes next. Also a hybrid whose cache is never trimmable: qwen3_next
(a gated delta net's ArraysCache beside a KVCache). Written without importing mlx, as tests.snapshots'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.snapshots import write_safetensors, write_tiny_llama

WINDOW = 8  # the sliding window, in tokens: the chat template alone is longer
_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16}


def _tokenizer_files(dest: Path, seed: int) -> dict:
    """tests.snapshots' tokenizer and template in `dest`: the llama's config, for its token ids."""
    write_tiny_llama(dest, seed=seed, dtype="float32")
    (dest / "model.safetensors").unlink()
    return json.loads((dest / "config.json").read_text())


class _Weights:
    def __init__(self, seed: int, scale: float) -> None:
        self._rng = np.random.default_rng(seed)
        self._scale = scale
        self.tensors: dict[str, np.ndarray] = {}

    def dense(self, name: str, *shape: int) -> None:
        self.tensors[name] = (self._rng.standard_normal(shape, dtype=np.float32) * self._scale)

    def const(self, name: str, value: float, *shape: int) -> None:
        self.tensors[name] = np.full(shape, value, np.float32)


def _attention(w: _Weights, p: str, cfg: dict, bias: bool) -> None:
    q, kv, hidden = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], cfg["hidden_size"]
    for name, rows, cols in (("q_proj", q, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, q)):
        w.dense(f"{p}.self_attn.{name}.weight", rows, cols)
        if bias:
            w.dense(f"{p}.self_attn.{name}.bias", rows)


def write_tiny_gemma3_text(dest: Path, *, seed: int = 0, window: int = WINDOW, scale: float = 0.3) -> Path:
    """A random 2-layer gemma3_text: layer 0 slides over `window` tokens (RotatingKVCache), layer 1
    attends to everything (KVCache). Its norms scale by 1 + weight: zeros are the identity."""
    dest = Path(dest)
    base = _tokenizer_files(dest, seed)
    cfg = dict(_SHAPE, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=base["vocab_size"],
               bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], rms_norm_eps=1e-6,
               sliding_window=window, sliding_window_pattern=2, query_pre_attn_scalar=_SHAPE["head_dim"],
               rope_theta=10000.0, rope_local_base_freq=10000.0, max_position_embeddings=2048,
               torch_dtype="float32")
    w = _Weights(seed, scale)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    w.dense("model.embed_tokens.weight", cfg["vocab_size"], hidden)
    # Its own head: tied to the embedding, which gemma3 scales by sqrt(hidden_size), every token
    # would predict itself.
    w.dense("lm_head.weight", cfg["vocab_size"], hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        _attention(w, p, cfg, bias=False)
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            w.const(f"{p}.{norm}.weight", 0.0, cfg["head_dim"])
        w.dense(f"{p}.mlp.gate_proj.weight", inter, hidden)
        w.dense(f"{p}.mlp.up_proj.weight", inter, hidden)
        w.dense(f"{p}.mlp.down_proj.weight", hidden, inter)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.const(f"{p}.{norm}.weight", 0.0, hidden)
    w.const("model.norm.weight", 0.0, hidden)
    return _write(dest, cfg, w)


def write_tiny_gpt_oss(dest: Path, *, seed: int = 0, window: int = WINDOW, scale: float = 0.3,
                       experts: int = 4) -> Path:
    """A random 2-layer gpt_oss (attention sinks, a mixture of `experts`, 2 per token): layer 0
    slides over `window` tokens (RotatingKVCache), layer 1 attends to everything (KVCache). Weights
    in mlx-lm's own layout (gate_proj / up_proj apart), which its sanitize leaves as they are."""
    dest = Path(dest)
    base = _tokenizer_files(dest, seed)
    cfg = dict(_SHAPE, model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=base["vocab_size"],
               bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], rms_norm_eps=1e-5,
               sliding_window=window, layer_types=["sliding_attention", "full_attention"],
               num_local_experts=experts, num_experts_per_tok=2, rope_theta=10000, torch_dtype="float32")
    w = _Weights(seed, scale)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    w.dense("model.embed_tokens.weight", cfg["vocab_size"], hidden)
    w.dense("lm_head.weight", cfg["vocab_size"], hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        _attention(w, p, cfg, bias=True)
        w.dense(f"{p}.self_attn.sinks", cfg["num_attention_heads"])
        w.dense(f"{p}.mlp.router.weight", experts, hidden)
        w.dense(f"{p}.mlp.router.bias", experts)
        for name, rows, cols in (("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)):
            w.dense(f"{p}.mlp.experts.{name}.weight", experts, rows, cols)
            w.dense(f"{p}.mlp.experts.{name}.bias", experts, rows)
        w.const(f"{p}.input_layernorm.weight", 1.0, hidden)
        w.const(f"{p}.post_attention_layernorm.weight", 1.0, hidden)
    w.const("model.norm.weight", 1.0, hidden)
    return _write(dest, cfg, w)


def write_tiny_qwen3_next(dest: Path, *, seed: int = 0, scale: float = 0.3) -> Path:
    """A random 2-layer qwen3_next (the Qwen3-Next / Qwen3.5 hybrid): layer 0 a gated delta net
    (ArraysCache: a convolution's and a recurrent state, never trimmable), layer 1 gated full
    attention (KVCache); dense MLPs (mlp_only_layers), so mlx-lm's sanitize leaves the weights as
    they are, norms included (no 1 + weight shift): ones are the identity."""
    dest = Path(dest)
    base = _tokenizer_files(dest, seed)
    heads, kv_heads, head_dim, hidden = 4, 2, 16, _SHAPE["hidden_size"]
    lin = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
           "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4}
    cfg = dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], hidden_size=hidden,
               num_hidden_layers=2, intermediate_size=128, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=head_dim, num_experts=0, num_experts_per_tok=0, decoder_sparse_step=1,
               shared_expert_intermediate_size=0, mlp_only_layers=[0, 1], moe_intermediate_size=0,
               rms_norm_eps=1e-6, vocab_size=base["vocab_size"], rope_theta=10000.0, partial_rotary_factor=0.25,
               max_position_embeddings=2048, full_attention_interval=2, tie_word_embeddings=False,
               bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], torch_dtype="float32", **lin)
    key_dim = lin["linear_num_key_heads"] * lin["linear_key_head_dim"]
    value_dim = lin["linear_num_value_heads"] * lin["linear_value_head_dim"]
    w = _Weights(seed, scale)
    w.dense("model.embed_tokens.weight", cfg["vocab_size"], hidden)
    w.dense("lm_head.weight", cfg["vocab_size"], hidden)
    p = "model.layers.0.linear_attn"
    w.dense(f"{p}.conv1d.weight", 2 * key_dim + value_dim, lin["linear_conv_kernel_dim"], 1)
    w.dense(f"{p}.in_proj_qkvz.weight", 2 * key_dim + 2 * value_dim, hidden)
    w.dense(f"{p}.in_proj_ba.weight", 2 * lin["linear_num_value_heads"], hidden)
    w.const(f"{p}.dt_bias", 1.0, lin["linear_num_value_heads"])
    w.const(f"{p}.A_log", -3.0, lin["linear_num_value_heads"])  # a slow decay: the state remembers
    w.const(f"{p}.norm.weight", 1.0, lin["linear_value_head_dim"])
    w.dense(f"{p}.out_proj.weight", hidden, value_dim)
    p = "model.layers.1.self_attn"
    for name, rows, cols in (("q_proj", 2 * heads * head_dim, hidden), ("k_proj", kv_heads * head_dim, hidden),
                             ("v_proj", kv_heads * head_dim, hidden), ("o_proj", hidden, heads * head_dim)):
        w.dense(f"{p}.{name}.weight", rows, cols)
    w.const(f"{p}.q_norm.weight", 1.0, head_dim)
    w.const(f"{p}.k_norm.weight", 1.0, head_dim)
    for i in range(2):
        p = f"model.layers.{i}"
        for name, rows, cols in (("gate_proj", 128, hidden), ("up_proj", 128, hidden), ("down_proj", hidden, 128)):
            w.dense(f"{p}.mlp.{name}.weight", rows, cols)
        w.const(f"{p}.input_layernorm.weight", 1.0, hidden)
        w.const(f"{p}.post_attention_layernorm.weight", 1.0, hidden)
    w.const("model.norm.weight", 1.0, hidden)
    return _write(dest, cfg, w)


def _write(dest: Path, cfg: dict, w: _Weights) -> Path:
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(dest / "model.safetensors", w.tensors, {"format": "mlx"})
    return dest


WRITERS = {"gemma3_text": write_tiny_gemma3_text, "gpt_oss": write_tiny_gpt_oss, "qwen3_next": write_tiny_qwen3_next}
