"""The embed worker's engine: a BERT encoder in mlx with sentence-transformers pooling, and the
batcher that serves EmbedRequests in forward passes bounded by padded tokens.

Written here rather than taken from mlx-embeddings: its 0.1.0 pulls mlx-vlm and through it
opencv-python, pyarrow, pandas, datasets and mlx-audio (~150 MB of wheels, none used to embed
text), for an encoder that is ~60 lines of mlx. The forward is BERT's (embeddings, post-norm
encoder layers with exact GELU), the pooling what 1_Pooling/config.json names (mean, CLS, max,
mean/sqrt(len)), normalised when modules.json lists Normalize (or there is no modules.json, as
OpenAI's vectors are). Inputs past the model's max_seq_length (sentence_bert_config.json, else its
position limit) are truncated there, as sentence-transformers does. It never imports mlx_lm: an
embed worker's start pays mlx's import alone.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from protocol import limits
from protocol.errors import ErrorCode
from protocol.messages import EmbedRequest, Embeddings, Error
from protocol.phase import Phase

ENGINE = ("lmx_embed", "1")  # the version the registry keys on (supervisor.admission.architectures)
TYPES = frozenset({"bert"})
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


class EmbedEngine:
    """Owns the encoder's weights and tokenizer. Importing mlx happens here and only here."""

    def __init__(self) -> None:
        import mlx.core as mx  # deferred: the memory limit must be in place before mlx loads

        self._mx = mx
        self._proc = psutil.Process()
        self.model = None  # what worker.main reads of an engine
        self.dims = 0
        # Where the position table's rows begin: 0 for BERT; XLM-RoBERTa's positions start past its
        # padding id (worker.rerank sets it), which also takes those rows from the position limit.
        self.position_offset = 0

    def versions(self) -> dict:
        return {"mlx": self._mx.__version__, ENGINE[0]: ENGINE[1]}

    def memory(self) -> dict:
        mx = self._mx
        return {"rss_bytes": self._proc.memory_info().rss, "mlx_active_bytes": mx.get_active_memory(),
                "mlx_peak_bytes": mx.get_peak_memory()}

    def set_memory_limit(self, limit_bytes: int) -> None:
        self._mx.set_memory_limit(limit_bytes)

    def load(self, path: str) -> float:
        start = time.monotonic()
        root = Path(path)
        cfg = _json(root / "config.json") or {}
        if cfg.get("model_type") not in TYPES:
            raise ValueError(f"model_type {cfg.get('model_type')!r} is no encoder this worker implements "
                             f"({sorted(TYPES)})")
        self._cfg = cfg
        self._weights(root)
        self._tokenizer(root, cfg)
        pooling = _json(root / "1_Pooling" / "config.json") or {"pooling_mode_mean_tokens": True}
        self.pooling = next((m for m in POOLING_MODES if pooling.get(f"pooling_mode_{m}")), "mean_tokens")
        modules = _json(root / "modules.json")
        self.normalize = modules is None or any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        self.dims = int(cfg["hidden_size"])
        self.model = self
        return time.monotonic() - start

    def _weights(self, root: Path) -> None:
        mx = self._mx
        raw: dict[str, Any] = {}
        for f in sorted(root.glob("*.safetensors")):
            raw.update(mx.load(str(f)))
        w = {k.removeprefix("bert.").removeprefix("roberta."): v.astype(mx.float32) for k, v in raw.items()}
        # Linear weights transposed once, so every layer's matmul is x @ W.
        self._w = {k: (v.T if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k else v)
                   for k, v in w.items()}
        mx.eval(list(self._w.values()))

    def _tokenizer(self, root: Path, cfg: dict) -> None:
        from tokenizers import Tokenizer  # the fast tokenizer alone: no transformers import

        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        st = _json(root / "sentence_bert_config.json") or {}
        positions = int(cfg.get("max_position_embeddings", 512)) - self.position_offset
        self.max_len = min(int(st.get("max_seq_length") or 512), positions)
        tok.no_padding()
        tok.enable_truncation(self.max_len)
        self._tok = tok
        self._cls, self._sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        self._vocab = int(cfg.get("vocab_size", tok.get_vocab_size()))
        self._pad = int(cfg.get("pad_token_id") or 0)

    def tokens(self, inputs: list) -> list[list[int]]:
        """Each input as the encoder's ids: text through the tokenizer (with its special tokens),
        a token array as given, inside [CLS] ... [SEP] when it lacks them; both truncated."""
        if isinstance(inputs[0], str):
            return [e.ids for e in self._tok.encode_batch(inputs)]
        out = []
        for ids in inputs:
            if any(i >= self._vocab for i in ids):
                raise ValueError(f"a token id is past the vocabulary ({self._vocab})")
            if self._cls is not None and self._sep is not None and ids[:1] != [self._cls]:
                ids = [self._cls, *ids[:self.max_len - 2], self._sep]
            out.append(list(ids[:self.max_len]))
        return out

    def embed(self, ids: list[list[int]]) -> np.ndarray:
        """Pooled (and normalised) vectors of one batch, float32 [len(ids), dims]."""
        mx = self._mx
        longest = max(len(s) for s in ids)
        batch = mx.array([s + [self._pad] * (longest - len(s)) for s in ids], dtype=mx.int32)
        mask = mx.array([[1.0] * len(s) + [0.0] * (longest - len(s)) for s in ids], dtype=mx.float32)
        hidden = self._encode(batch, mask)
        pooled = self._pool(hidden, mask)
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        return np.array(pooled, dtype=np.float32)

    def batcher(self, progress: Any, send: Any) -> "EmbedBatcher":
        """The serve loop's batcher for this engine (worker.main)."""
        return EmbedBatcher(self, progress, send)

    def _encode(self, ids: Any, mask: Any, types: Any = None) -> Any:
        """The last layer's hidden states. `types`: each token's segment (a pair's second text is
        1, worker.rerank's); none, every token is segment 0."""
        mx, w, cfg = self._mx, self._w, self._cfg
        import mlx.nn as nn

        eps = float(cfg.get("layer_norm_eps", 1e-12))
        heads = int(cfg["num_attention_heads"])
        b, n = ids.shape
        segments, first = w["embeddings.token_type_embeddings.weight"], self.position_offset
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][first:first + n][None]
             + (segments[0] if types is None else segments[types]))
        def norm(v: Any, name: str) -> Any:
            return mx.fast.layer_norm(v, w[f"{name}.weight"], w[f"{name}.bias"], eps)

        x = norm(x, "embeddings.LayerNorm")
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]  # padding is never attended to

        def dense(v: Any, name: str) -> Any:
            return v @ w[f"{name}.weight"] + w[f"{name}.bias"]

        def split(v: Any) -> Any:
            return v.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)

        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (split(dense(x, p + f"attention.self.{t}")) for t in ("query", "key", "value"))
            scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1]) + bias
            att = (mx.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
            x = norm(x + dense(att, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = dense(nn.gelu(dense(x, p + "intermediate.dense")), p + "output.dense")
            x = norm(x + h, p + "output.LayerNorm")
        return x

    def _pool(self, hidden: Any, mask: Any) -> Any:
        mx = self._mx
        m = mask[..., None]
        if self.pooling == "cls_token":
            return hidden[:, 0]
        if self.pooling == "max_tokens":
            return mx.max(hidden + (m - 1.0) * 1e9, axis=1)
        total, count = mx.sum(hidden * m, axis=1), mx.maximum(mx.sum(m, axis=1), 1.0)
        return total / (mx.sqrt(count) if self.pooling == "mean_sqrt_len_tokens" else count)


def batches(lengths: list[int], budget: int = limits.EMBED_BATCH_TOKENS) -> list[list[int]]:
    """Indices into `lengths` cut into forward passes of at most `budget` padded tokens (count x
    longest), shortest first so that little of each pass is padding; one input per pass at least."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[i] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def finish(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Truncated to `dimensions` and re-normalised, where asked (Matryoshka-style truncation)."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


class EmbedBatcher:
    """The serve loop's batcher for an embed worker (worker.main._serve's interface): requests
    wait until the next step, which embeds every waiting request's inputs together, in passes of
    at most EMBED_BATCH_TOKENS padded tokens, and answers each with one Embeddings."""

    SERVES = EmbedRequest  # what worker.main hands it (a generation is another kind's)

    def __init__(self, engine: EmbedEngine, progress: Any, send: Any) -> None:
        self._engine, self._progress, self._send = engine, progress, send
        self._waiting: list[EmbedRequest] = []
        self.prefix = _NoPrefixCache()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, req: EmbedRequest) -> None:
        self._waiting.append(req)

    def cancel(self, request_id: str) -> None:
        before = len(self._waiting)
        self._waiting = [r for r in self._waiting if r.request_id != request_id]
        if len(self._waiting) < before:  # answered already otherwise: its Embeddings is on the wire
            self._send(Error(request_id, ErrorCode.CANCELLED.code, "cancelled by client"))

    def cancel_all(self) -> None:
        for req in list(self._waiting):
            self.cancel(req.request_id)

    def step(self) -> None:
        reqs, self._waiting = self._waiting, []
        self._progress.phase = Phase.PREFILL
        try:
            for out in self._answer_all(reqs):
                self._send(out)
        finally:
            self._progress.phase = Phase.IDLE

    def _answer_all(self, reqs: list[EmbedRequest]) -> list[Embeddings | Error]:
        """Every request's Embeddings (or its own BAD_REQUEST), the inputs of all in shared passes."""
        engine, served, ids, out = self._engine, [], [], []
        for req in reqs:
            try:
                if req.dimensions is not None and req.dimensions > engine.dims:
                    raise ValueError(f"dimensions {req.dimensions} is more than the model's {engine.dims}")
                ids.extend(engine.tokens(req.inputs))
                served.append(req)
            except (ValueError, TypeError) as exc:
                out.append(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot embed: {exc}"))
        vectors = np.zeros((len(ids), engine.dims), dtype=np.float32)
        for part in batches([len(s) for s in ids]):
            vectors[part] = engine.embed([ids[i] for i in part])
            self._progress.count += 1  # a pass done: progress, for the stall watch
        start = 0
        for req in served:
            end = start + len(req.inputs)
            mine = finish(vectors[start:end], req.dimensions)
            tokens = sum(len(s) for s in ids[start:end])
            out.append(Embeddings(req.request_id, mine.shape[1], mine.astype("<f4").tobytes(), tokens))
            start = end
        return out


class _NoPrefixCache:
    """An embed worker keeps no prefix cache; ClearPrefixCache clears nothing."""

    enabled = False

    @staticmethod
    def clear() -> dict:
        return {"entries": 0, "bytes": 0}
