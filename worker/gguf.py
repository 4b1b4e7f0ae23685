"""Import a llama-architecture GGUF file into an MLX snapshot directory that mlx_lm.load reads."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp pre-tokenizer name -> whether digits are split one by one before the GPT-2 regex.
# Unknown names are refused: a wrong split silently degrades every prompt.
_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True, "starcoder": True, "refact": True}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER = 3, 4
_GGUF_MAGIC = b"GGUF"


class GgufImportError(Exception):
    """The GGUF file cannot be turned into a snapshot; the message names the file and the reason."""


def _open_gguf(path: Path) -> tuple[dict, dict]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GgufImportError(f"{path}: cannot read GGUF file: {e.strerror or e}") from e
    # mx.load's own error for a non-GGUF file is cryptic; check the magic first.
    if magic != _GGUF_MAGIC:
        raise GgufImportError(f"{path}: not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise GgufImportError(
            f"{path}: mlx cannot load this GGUF (corrupt, or a tensor type mlx does not read): {e}"
        ) from e


def _meta(meta: dict, key: str, path: Path, default=None):
    value = meta.get(key, default)
    if value is None:
        raise GgufImportError(f"{path}: required GGUF metadata {key!r} is missing")
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _f32(value: float) -> float:
    # GGUF floats are float32; the shortest float32 repr keeps config.json readable (1e-05, not 9.99e-06).
    return float(str(np.float32(value)))


def _mlx_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "scales", "biases"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _map_weights(weights: dict, n_layers: int, path: Path) -> dict:
    mapped, unknown = {}, []
    for name, value in weights.items():
        new = _mlx_name(name)
        if new is None:
            unknown.append(name)
        else:
            mapped[new] = value
    if unknown:
        raise GgufImportError(f"{path}: cannot map GGUF tensors to llama: {', '.join(sorted(unknown)[:8])}")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in _LAYER_NAMES.values()
    }
    missing = sorted(expected - mapped.keys())
    extra = sorted(k for k in mapped if k.rsplit(".", 1)[0] + ".weight" not in expected | {"lm_head.weight"})
    if missing or extra:
        raise GgufImportError(
            f"{path}: tensors do not match {n_layers} llama blocks: missing {missing[:4]}, extra {extra[:4]}"
        )
    return mapped


def _hyperparameters(meta: dict, path: Path) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GgufImportError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    hidden = _meta(meta, "llama.embedding_length", path)
    heads = _meta(meta, "llama.attention.head_count", path)
    head_dim = _meta(meta, "llama.attention.key_length", path, hidden // heads)
    if _meta(meta, "llama.rope.dimension_count", path, head_dim) != head_dim:
        raise GgufImportError(f"{path}: partial rotary embeddings are not supported")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": _meta(meta, "llama.feed_forward_length", path),
        "num_hidden_layers": _meta(meta, "llama.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(meta, "llama.attention.head_count_kv", path, heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_meta(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _f32(_meta(meta, "llama.rope.freq_base", path, 10000.0)),
        "max_position_embeddings": _meta(meta, "llama.context_length", path),
        # llama.cpp permutes Q/K rows for its interleaved rope; mlx's traditional rope matches it.
        "rope_traditional": True,
    }
    scaling = _meta(meta, "llama.rope.scaling.type", path, "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": _f32(_meta(meta, "llama.rope.scaling.factor", path))}
    elif scaling != "none":
        raise GgufImportError(f"{path}: rope scaling {scaling!r} is not supported")
    return cfg


def _in_features(module: str, cfg: dict) -> int:
    if module.endswith("o_proj"):
        return cfg["num_attention_heads"] * cfg["head_dim"]
    if module.endswith("down_proj"):
        return cfg["intermediate_size"]
    return cfg["hidden_size"]


def _quantization(weights: dict, cfg: dict, path: Path) -> dict | None:
    """Derive bits and group size per module from packed shapes, as GGUF files may mix types."""
    per_module = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        in_features = _in_features(module, cfg)
        bits, rem = divmod(weights[f"{module}.weight"].shape[-1] * 32, in_features)
        if rem or bits not in (2, 3, 4, 5, 6, 8) or in_features % scales.shape[-1]:
            raise GgufImportError(f"{path}: cannot derive the quantization of {module}")
        per_module[module] = {"group_size": in_features // scales.shape[-1], "bits": bits}
    if not per_module:
        return None
    common = Counter(tuple(q.items()) for q in per_module.values()).most_common(1)[0][0]
    quant = dict(common)
    # mlx_lm's class predicate looks modules up by path, so only the exceptions need listing.
    quant.update({m: q for m, q in per_module.items() if tuple(q.items()) != common})
    return quant


def _build_tokenizer(meta: dict, path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GgufImportError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in _PRE_TOKENIZERS:
        raise GgufImportError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    tokens = _meta(meta, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _meta(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = np.array(meta.get("tokenizer.ggml.token_type", mx.zeros(len(tokens), mx.int32)))
    specials = [tokens[i] for i in np.flatnonzero(types == _TOKEN_TYPE_CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i in np.flatnonzero(types == _TOKEN_TYPE_USER)])
    if _meta(meta, "tokenizer.ggml.add_bos_token", path, False):
        bos_id = _meta(meta, "tokenizer.ggml.bos_token_id", path)
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    return tok, tokens, specials


def _tokenizer_files(meta: dict, tokens: list, specials: list, cfg: dict, path: Path) -> dict:
    named = {}
    for role in ("bos", "eos", "padding", "unknown"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            named[{"padding": "pad", "unknown": "unk"}.get(role, role) + "_token"] = tokens[token_id.item()]
    special_map = dict(named, additional_special_tokens=specials)
    config = dict(
        named,
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=bool(_meta(meta, "tokenizer.ggml.add_bos_token", path, False)),
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=cfg["max_position_embeddings"],
    )
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_snapshot(tmp: Path, weights: dict, cfg: dict, tok, token_files: dict, progress) -> int:
    total = sum(v.nbytes for v in weights.values())
    if progress:
        progress(0, total)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    if progress:
        progress(total, total)
    _write_json(tmp / "config.json", cfg)
    tok.save(str(tmp / "tokenizer.json"))
    for name, obj in token_files.items():
        _write_json(tmp / name, obj)
    return sum(f.stat().st_size for f in tmp.iterdir())


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GgufImportError(f"{dest}: destination already exists and is not an empty directory")


def import_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike, *, progress=None) -> dict:
    """Convert `gguf_path` into an MLX snapshot at `dest`; returns a summary of what was written.

    `progress(done_bytes, total_bytes)` is called before and after the weights are written.
    """
    src, dest = Path(gguf_path), Path(dest)
    _check_dest(dest)
    weights, meta = _open_gguf(src)
    cfg = _hyperparameters(meta, src)
    mapped = _map_weights(weights, cfg["num_hidden_layers"], src)
    tok, tokens, specials = _build_tokenizer(meta, src)
    cfg["vocab_size"] = mapped["model.embed_tokens.weight"].shape[0]
    cfg["tie_word_embeddings"] = "lm_head.weight" not in mapped
    for role in ("bos", "eos"):
        cfg[f"{role}_token_id"] = _meta(meta, f"tokenizer.ggml.{role}_token_id", src)
    quant = _quantization(mapped, cfg, src)
    if quant:
        cfg["quantization"] = quant
    token_files = _tokenizer_files(meta, tokens, specials, cfg, src)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        written = _write_snapshot(tmp, mapped, cfg, tok, token_files, progress)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the snapshot from other users
        # rename(2) replaces an empty directory atomically and fails on a non-empty one.
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GgufImportError(f"{dest}: cannot write snapshot: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary_quant = {k: v for k, v in (quant or {}).items() if k in ("group_size", "bits")}
    return {"source": str(src), "dest": str(dest), "model_type": "llama", "tensors": len(mapped),
            "bytes": written, "vocab_size": cfg["vocab_size"], "quantization": summary_quant or None}


def main(argv: list[str] | None = None) -> int:
    """`lmxctl import-gguf` runs this in its own process (mlx stays out of lmxctl), so what it prints
    and its exit status are lmxctl's: progress on stderr, then `wrote DEST`, or one JSON line with --json."""
    parser = argparse.ArgumentParser(prog="python -m worker.gguf", description=__doc__)
    parser.add_argument("gguf", help="path to a llama-architecture .gguf file")
    parser.add_argument("dest", help="snapshot directory to create (must not exist or be empty)")
    parser.add_argument("--json", action="store_true", help="one JSON object: the summary, or the error")
    args = parser.parse_args(argv)

    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"  weights: {done:,}/{total:,} bytes ({100 * done / max(1, total):.0f}%)",
                  file=sys.stderr, flush=True)

    try:
        summary = import_gguf(args.gguf, args.dest, progress=progress)
    except GgufImportError as e:
        if args.json:
            print(json.dumps({"error": {"code": "IMPORT_FAILED", "message": str(e)}}))
        else:
            print(f"import-gguf: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str) if args.json else f"wrote {summary['dest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
