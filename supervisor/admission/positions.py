"""A model's position limit, from its config.json (never mlx): the most tokens one sequence may hold.
`context_tokens` above it is clamped to it at the worker's start, with a warning naming both
numbers (docs/architecture.md, "Context"): past the positions the model was trained for, its
attention reads positions it never learned, so such a prompt is refused as context_length_exceeded
like any prompt past context_tokens, rather than served as noise."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.admission.textconfig import text_fields

# The text model's field (supervisor.admission.textconfig), or gpt2's name for it.
_KEYS = ("max_position_embeddings", "n_positions")
# RoPE scalings that stretch the table past max_position_embeddings by `factor` (llama3's and
# longrope's configs already give the stretched figure as max_position_embeddings).
_STRETCHING = ("yarn", "dynamic")


def _limit(cfg: dict) -> int | None:
    value = next((cfg[k] for k in _KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0), None)
    if value is None:
        return None
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("type") or scaling.get("rope_type")) in _STRETCHING:
        factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings") or value
        if isinstance(factor, (int, float)) and factor > 1 and isinstance(original, int):
            value = max(value, int(original * factor))
    return value


def position_limit(path: str) -> int | None:
    """None when the snapshot's config names no limit (or cannot be read: its integrity check says so)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return _limit(text_fields(cfg)) if isinstance(cfg, dict) else None


def context_tokens(path: str, configured: int) -> tuple[int, int | None]:
    """(the context_tokens a worker gets, the model's limit when it is below `configured`, else None)."""
    limit = position_limit(path)
    if limit is not None and configured > limit:
        return limit, limit
    return configured, None
