"""What kinds of model there are, which ones this version serves, and a snapshot's kind as its
files say (the config's `kind` key overrides it): read from JSON files, never with mlx."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from supervisor.configproblem import Problem

GENERATE, EMBED, RERANK, VISION = "generate", "embed", "rerank", "vision"
# Each kind and what becomes of a model of it here: served, or refused at config time as not
# supported yet (a config error the operator sees at load or reload, not a worker that starts and
# fails; UNSUPPORTED_ARCHITECTURE stays the word for a snapshot whose architecture the kind's engine
# lacks). Rerank and vision have their entry so the table, lmxctl and metrics know the words.
KINDS: dict[str, str | None] = {
    GENERATE: None,
    EMBED: None,
    RERANK: "not supported yet (issue 25 item 3)",
    VISION: "not supported yet (issue 25 item 4)",
}
# config.json model_types that are encoders, not decoders: detected as embed even without a
# sentence-transformers pooling file (mean pooling is then assumed).
ENCODER_TYPES = frozenset({"bert"})
POOLING_CONFIG = "1_Pooling/config.json"


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def detect(path: str | os.PathLike) -> str:
    """A sentence-transformers snapshot (1_Pooling/config.json) or a BERT config.json is embed;
    anything else, a missing snapshot included (admission reports that), generate."""
    root = Path(path)
    if (root / POOLING_CONFIG).is_file():
        return EMBED
    if _json(root / "config.json").get("model_type") in ENCODER_TYPES:
        return EMBED
    return GENERATE


def embed_dims(path: str | os.PathLike) -> int | None:
    """The width of an embed model's vectors: the pooling config's, else the encoder's hidden size."""
    root = Path(path)
    for value in (_json(root / POOLING_CONFIG).get("word_embedding_dimension"),
                  _json(root / "config.json").get("hidden_size")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve(prefix: str, table: dict[str, Any], path: str) -> str:
    """A [[models]] table's kind: its `kind` key (popped), else detected from the snapshot at
    `path`. An embed model keeps no prefix cache (a vector has no KV to reuse): the table's cache
    keys are set to off, and a size given for one, or a group, is a Problem."""
    kind = table.pop("kind", None)
    if kind is None:
        kind = detect(path)
    elif not isinstance(kind, str) or kind not in KINDS:
        raise Problem(f"{prefix}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    if KINDS[kind] is not None:
        raise Problem(f"{prefix}.kind", f"{kind!r}: {KINDS[kind]}")
    if kind == EMBED:
        if "group" in table:
            raise Problem(f"{prefix}.group", "an embed model runs in one worker: no group")
        for key in ("prefix_cache_bytes", "prefix_cache_disk_bytes"):
            if table.get(key, 0) not in (0, -1):
                raise Problem(f"{prefix}.{key}", "an embed model has no prefix cache: leave it out or 0")
            table[key] = 0
    return kind
