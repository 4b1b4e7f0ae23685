"""Which model types the installed mlx-lm implements, found from its files (never by importing it:
the supervisor must not load mlx)."""

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


def supported(model_type: str) -> bool:
    _, names, remap = installed()
    return remap.get(model_type, model_type) in names
