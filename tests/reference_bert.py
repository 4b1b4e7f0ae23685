"""BERT's encoder in float64 numpy, from a snapshot's safetensors and config.json alone: the
independent computation the embed and rerank workers' outputs are checked against (post-norm
layers, exact GELU, positions from `first`, RoBERTa's being its padding id + 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class ReferenceBert:
    def __init__(self, path: Path) -> None:
        from safetensors.numpy import load_file

        self.cfg = json.loads((path / "config.json").read_text())
        self.w = {k.removeprefix("bert.").removeprefix("roberta."): v.astype(np.float64)
                  for k, v in load_file(str(path / "model.safetensors")).items()}
        self._erf = np.vectorize(math.erf)

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.cfg["layer_norm_eps"]) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def lin(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def encode(self, ids: list[int], types: list[int] | None = None, first: int = 0) -> np.ndarray:
        """The last layer's hidden states of one sequence (no padding, no mask)."""
        w, n, heads = self.w, len(ids), self.cfg["num_attention_heads"]
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][first:first + n]
             + w["embeddings.token_type_embeddings.weight"][types if types is not None else [0] * n])
        x = self.norm(x, "embeddings.LayerNorm")
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (self.lin(x, p + f"attention.self.{t}").reshape(n, heads, -1).transpose(1, 0, 2)
                       for t in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
            s = np.exp(s - s.max(-1, keepdims=True))
            a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1)
            x = self.norm(x + self.lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self.lin(x, p + "intermediate.dense")
            x = self.norm(x + self.lin(0.5 * h * (1 + self._erf(h / math.sqrt(2))), p + "output.dense"),
                          p + "output.LayerNorm")
        return x
