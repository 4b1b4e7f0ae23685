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
# lacks). Vision has its entry so the table, lmxctl and metrics know the word.
KINDS: dict[str, str | None] = {
    GENERATE: None,
    EMBED: None,
    RERANK: None,
    VISION: "not supported yet (issue 25 item 4)",
}
# The kinds whose worker runs an encoder over whole inputs (worker/embed.py, worker/rerank.py): one
# reply per request, no KV cache and so no prefix cache, one worker (no group).
ENCODER_KINDS = frozenset({EMBED, RERANK})
# config.json model_types that are encoders, not decoders: detected as embed even without a
# sentence-transformers pooling file (mean pooling is then assumed).
ENCODER_TYPES = frozenset({"bert"})
POOLING_CONFIG = "1_Pooling/config.json"
# config.json architectures of a cross-encoder (a one-label sequence classifier whose logit is the
# pair's relevance, worker/rerank.py's: BERT's, as ms-marco-MiniLM; XLM-RoBERTa's, as the
# bge-rerankers): detected as rerank.
CROSS_ENCODERS = frozenset({"BertForSequenceClassification", "XLMRobertaForSequenceClassification"})


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def num_labels(cfg: dict[str, Any]) -> int:
    """A classifier's outputs as transformers counts them: id2label's entries, else num_labels,
    else transformers' default of 2."""
    labels = cfg.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    value = cfg.get("num_labels")
    return value if isinstance(value, int) and not isinstance(value, bool) else 2


def is_cross_encoder(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures")
    named = isinstance(archs, list) and any(isinstance(a, str) and a in CROSS_ENCODERS for a in archs)
    return named and num_labels(cfg) == 1


def detect(path: str | os.PathLike) -> str:
    """A one-label BERT sequence classifier (a cross-encoder) is rerank; a sentence-transformers
    snapshot (1_Pooling/config.json) or another BERT config.json is embed; anything else, a missing
    snapshot included (admission reports that), generate."""
    root = Path(path)
    cfg = _json(root / "config.json")
    if is_cross_encoder(cfg):
        return RERANK
    if (root / POOLING_CONFIG).is_file():
        return EMBED
    if cfg.get("model_type") in ENCODER_TYPES:
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
    `path`. An embed or rerank model keeps no prefix cache (a vector or a score has no KV to
    reuse): the table's cache keys are set to off, and a size given for one, or a group, is a Problem."""
    kind = table.pop("kind", None)
    if kind is None:
        kind = detect(path)
    elif not isinstance(kind, str) or kind not in KINDS:
        raise Problem(f"{prefix}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    if KINDS[kind] is not None:
        raise Problem(f"{prefix}.kind", f"{kind!r}: {KINDS[kind]}")
    if kind in ENCODER_KINDS:
        article = "an" if kind == EMBED else "a"
        if "group" in table:
            raise Problem(f"{prefix}.group", f"{article} {kind} model runs in one worker: no group")
        for key in ("prefix_cache_bytes", "prefix_cache_disk_bytes"):
            if table.get(key, 0) not in (0, -1):
                raise Problem(f"{prefix}.{key}", f"{article} {kind} model has no prefix cache: leave it out or 0")
            table[key] = 0
    return kind
