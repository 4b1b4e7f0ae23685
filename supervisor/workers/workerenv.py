"""A worker's environment: built from an allow-list, never inherited whole, so the supervisor's
secrets (cloud keys, hub tokens, whatever its service manager or shell carried) stay out of a
process that runs model code and prints tracebacks."""

from __future__ import annotations

from typing import Mapping

# What a Python process running mlx-lm needs to find itself, its locale, its temp dir and caches.
ALLOWED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
    "SYSTEMROOT", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
})
ALLOWED_PREFIXES = ("LC_", "MLX_", "METAL_")


def build(parent: Mapping[str, str], worker: Mapping[str, str], hub_downloads: bool = False) -> dict[str, str]:
    """The allowed part of `parent`, then what the supervisor tells the worker (`worker`: the
    LMX_* variables). HF_HUB_OFFLINE=1 unless hub downloads are on: a worker loads a local
    snapshot, and nothing it imports should reach for the network on its own."""
    env = {k: v for k, v in parent.items() if k in ALLOWED or k.startswith(ALLOWED_PREFIXES)}
    if not hub_downloads:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(worker)
    return env
