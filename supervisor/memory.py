"""Memory admission: what a model will cost, what the machine can give, and who holds what.
Loads in flight hold their reservation too, so two concurrent loads cannot both squeeze in."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

# A worker's own cost before any weights: the interpreter, mlx-lm and its imports (measured
# ~250 MB RSS here), rounded up.
WORKER_OVERHEAD_BYTES = 256 * 2**20


def budget_bytes(configured: int, reserve: int) -> int:
    """memory_budget_bytes, else physical memory minus the reserve for everything else."""
    return configured if configured > 0 else max(0, psutil.virtual_memory().total - reserve)


def estimate(path: str, context_tokens: int, measured_peak: int | None = None) -> dict[str, int]:
    """weights (file sizes) + KV cache for `context_tokens` at float16 + worker overhead; a peak
    measured on this stack (from the registry) replaces the weights + KV guess once there is one."""
    root = Path(path)
    weights = sum(f.stat().st_size for f in root.glob("*.safetensors"))
    try:
        cfg = json.loads((root / "config.json").read_text())
        layers = int(cfg.get("num_hidden_layers", 0))
        heads = int(cfg.get("num_attention_heads", 1)) or 1
        kv_heads = int(cfg.get("num_key_value_heads", heads))
        head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
        kv = 2 * layers * kv_heads * head_dim * context_tokens * 2
    except (OSError, ValueError, TypeError):
        kv = 0
    model = max(measured_peak, weights) if measured_peak else weights + kv
    return {"weights": weights, "kv_cache": kv, "overhead": WORKER_OVERHEAD_BYTES,
            "measured_peak": measured_peak or 0, "total": model + WORKER_OVERHEAD_BYTES}


class MemoryLedger:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held: dict[str, int] = {}

    def others(self, model_id: str) -> int:
        return sum(v for k, v in self.held.items() if k != model_id)

    def try_reserve(self, model_id: str, need: int) -> bool:
        if self.others(model_id) + need > self.budget:
            return False
        self.held[model_id] = need
        return True

    def release(self, model_id: str) -> None:
        self.held.pop(model_id, None)
