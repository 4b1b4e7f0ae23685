"""Which model types each kind's engine implements: the installed mlx-lm's, found from its files
(never by importing it: the supervisor must not load mlx), and the embed worker's own encoder."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
from pathlib import Path


@functools.lru_cache(maxsize=1)
def installed() -> tuple[str | None, frozenset[str], dict[str, str]]:
    """(mlx-lm version, module names under mlx_lm/models, its MODEL_REMAPPING table)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.origin:
        return None, frozenset(), {}
    pkg = Path(spec.origin).parent
    names = frozenset(p.stem for p in (pkg / "models").glob("*.py") if not p.stem.startswith("_"))
    remap: dict[str, str] = {}
    try:
        tree = ast.parse((pkg / "utils.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
                remap = {k: v for k, v in ast.literal_eval(node.value).items()}
    except (OSError, SyntaxError, ValueError):
        remap = {}
    try:
        version = importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return version, names, remap


# What worker/embed.py implements (a BERT encoder written in mlx, with the pooling its snapshot's
# 1_Pooling/config.json names), and the version its worker reports as `lmx_embed` (the registry's
# backend key). Kept in step with it: tests/test_embed_worker.py compares the two.
EMBED_TYPES = frozenset({"bert"})
EMBED_ENGINE = ("lmx-embed", "1")
# worker/rerank.py's cross-encoders: that encoder (BERT's, or XLM-RoBERTa's, which differs in its
# position numbering) with a one-label classification head (tests/test_rerank.py compares the two).
RERANK_TYPES = frozenset({"bert", "xlm-roberta"})
RERANK_ENGINE = ("lmx-rerank", "1")


def supported(model_type: str, kind: str = "generate") -> bool:
    if kind == "embed":
        return model_type in EMBED_TYPES
    if kind == "rerank":
        return model_type in RERANK_TYPES
    _, names, remap = installed()
    return remap.get(model_type, model_type) in names


def engine(kind: str) -> tuple[str, str | None]:
    """The engine a model of `kind` loads with, and its version here: a refusal names both."""
    own = {"embed": EMBED_ENGINE, "rerank": RERANK_ENGINE}.get(kind)
    return own if own is not None else ("mlx-lm", installed()[0])
