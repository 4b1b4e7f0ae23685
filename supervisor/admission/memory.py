"""Memory admission: what a model will cost, what the machine can give, and who holds what.
Loads in flight hold their reservation too, so two concurrent loads cannot both squeeze in.
A worker that is gone must also have given its memory back to the machine before the next load is
admitted against the budget; what stays missing (a hard-killed Metal process can strand wired memory
until reboot on macOS) is counted as held, reported, and not blamed on the next model."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from protocol import limits
from supervisor.admission.textconfig import text_fields

# A worker's own cost before any weights: the interpreter, mlx-lm and its imports (measured
# ~250 MB RSS here), rounded up.
WORKER_OVERHEAD_BYTES = 256 * 2**20


def budget_bytes(configured: int, reserve: int) -> int:
    """memory_budget_bytes, else physical memory minus the reserve for everything else."""
    return configured if configured > 0 else max(0, psutil.virtual_memory().total - reserve)


def estimate(path: str, context_tokens: int, measured_peak: int | None = None,
             prefix_cache_bytes: int = 0, kind: str = "generate") -> dict[str, int]:
    """weights (file sizes) + KV cache for `context_tokens` at float16 (an embed model: the
    activations of its largest forward batch instead, in `kv_cache`) + the prefix cache's budget +
    worker overhead; a peak measured on this stack (from the registry) replaces the weights + KV
    guess once there is one (a canary's peak never includes a full prefix cache: it stays added)."""
    root = Path(path)
    weights = sum(f.stat().st_size for f in root.glob("*.safetensors"))
    try:
        cfg = text_fields(json.loads((root / "config.json").read_text()))
        kv = _batch_activations(cfg) if kind in ("embed", "rerank") else _kv_bytes(cfg, context_tokens)
    except (OSError, ValueError, TypeError, AttributeError):
        kv = 0
    model = max(measured_peak, weights) if measured_peak else weights + kv
    return {"weights": weights, "kv_cache": kv, "prefix_cache": prefix_cache_bytes, "overhead": WORKER_OVERHEAD_BYTES,
            "measured_peak": measured_peak or 0, "total": model + prefix_cache_bytes + WORKER_OVERHEAD_BYTES}


# Text models whose attention mlx-lm caches as one compressed latent per token and layer (MLA:
# kv_lora_rank wide, beside the rope key qk_rope_head_dim), not as keys and values per head: the
# deepseek_v3 family (Kimi K2 and K2.5's text model among them) and the archs that copy its cache.
_LATENT_KV = frozenset({"deepseek_v3", "deepseek_v32", "kimi_k2", "kimi_k25", "kimi_k3", "kimi_linear",
                        "joyai_llm_flash", "glm4_moe_lite", "longcat_flash", "bailing_moe_v3", "bailing_hybrid",
                        "mistral4"})


def _kv_bytes(cfg: dict, context_tokens: int) -> int:
    layers = int(cfg.get("num_hidden_layers", 0))
    if cfg.get("model_type") in _LATENT_KV and cfg.get("kv_lora_rank"):
        return layers * (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)) * context_tokens * 2
    heads = int(cfg.get("num_attention_heads", 1)) or 1
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
    return 2 * layers * kv_heads * head_dim * context_tokens * 2


def _batch_activations(cfg: dict) -> int:
    """An embed worker's working set: one forward pass over EMBED_BATCH_TOKENS padded tokens in
    float32, a layer at a time (its input and output, the feed-forward's inner width, and the
    attention scores of sequences up to the position limit). Nothing stays between requests."""
    tokens = limits.EMBED_BATCH_TOKENS
    hidden, inner = int(cfg.get("hidden_size", 0)), int(cfg.get("intermediate_size", 0))
    heads = int(cfg.get("num_attention_heads", 1)) or 1
    longest = min(int(cfg.get("max_position_embeddings", 512)), tokens)
    return 4 * tokens * (4 * hidden + inner + heads * longest)


# A departed worker's memory counts as back once the machine's available memory has risen by all
# but this share of its last RSS (the rest is noise from everything else on a shared box)...
RETURN_TOLERANCE = 0.5
# ...and never flag less than this.
STRANDED_MIN_BYTES = 128 * 2**20


def available_bytes() -> int:
    return psutil.virtual_memory().available


@dataclass
class Departure:
    """A worker that exited: its last reported RSS and the machine's available memory then."""
    model: str
    pid: int
    rss_bytes: int
    available_before: int
    at: float

    def missing(self, available_now: int) -> int:
        return max(0, self.rss_bytes - (available_now - self.available_before))

    def returned(self, available_now: int) -> bool:
        missing = self.missing(available_now)
        return missing < STRANDED_MIN_BYTES or missing <= self.rss_bytes * RETURN_TOLERANCE


class MemoryLedger:
    def __init__(self, budget: int, return_timeout_s: float = 5.0, log: Any = None, events: Any = None) -> None:
        self.budget = budget
        self.held: dict[str, int] = {}
        self.return_timeout_s = return_timeout_s
        self.departures: list[Departure] = []
        self.stranded: dict[str, dict[str, Any]] = {}  # "model:pid" -> what stayed missing
        self._log = log
        self._events = events

    def others(self, model_id: str) -> int:
        stranded = sum(s["bytes"] for s in self.stranded.values())
        return stranded + sum(v for k, v in self.held.items() if k != model_id)

    def stranded_bytes(self) -> int:
        return sum(s["bytes"] for s in self.stranded.values())

    def worker_exited(self, model_id: str, pid: int, rss_bytes: int, available_before: int | None) -> None:
        if rss_bytes > 0 and available_before:
            self.departures.append(Departure(model_id, pid, rss_bytes, available_before, time.monotonic()))

    async def settle(self) -> None:
        """Before admitting against the budget: wait (bounded) until every departed worker's memory is
        back. What is still missing at the deadline is stranded: held from the budget and reported."""
        while self.departures:
            d = self.departures[0]
            deadline = d.at + self.return_timeout_s
            while not d.returned(available_bytes()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.departures.pop(0)
            now = available_bytes()
            if d.returned(now):
                continue
            missing = d.missing(now)
            self.stranded[f"{d.model}:{d.pid}"] = {"model": d.model, "worker_pid": d.pid, "bytes": missing,
                                                   "worker_rss_bytes": d.rss_bytes, "since": time.time()}
            if self._events is not None:
                self._events.publish("memory.not_returned", model=d.model, worker_pid=d.pid, missing_bytes=missing)
            if self._log is not None:
                self._log.error("memory.not_returned", model=d.model, worker_pid=d.pid, missing_bytes=missing,
                                worker_rss_bytes=d.rss_bytes, available_bytes=now,
                                hint="memory of a dead worker was not given back to the machine; it is held "
                                     "from the budget until the supervisor restarts (macOS: wired Metal "
                                     "memory can stay stranded until reboot)")

    def try_reserve(self, model_id: str, need: int) -> bool:
        if self.others(model_id) + need > self.budget:
            return False
        self.held[model_id] = need
        return True

    def release(self, model_id: str) -> None:
        self.held.pop(model_id, None)
