"""The compatibility registry's keys: which model (a fingerprint of its snapshot) on which backend
(mlx-lm and mlx versions, platform, OS, machine), read without importing mlx."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """The installed mlx and mlx-lm: a group's hosts must all run the same (docs/distributed.md)."""
    return {"mlx": _version("mlx"), "mlx_lm": _version("mlx-lm")}


@functools.lru_cache(maxsize=1)
def backend() -> str:
    """One string per stack, e.g. `mlx-lm 0.32.2 / mlx 0.32.4 / Linux 6.1 x86_64`."""
    os_version = platform.mac_ver()[0] or platform.release()
    return (f"mlx-lm {_version('mlx-lm')} / mlx {_version('mlx')} / {platform.system()} {os_version} "
            f"{platform.machine()}")


def fingerprint(path: str) -> str:
    """The model, not its location: config.json's content plus every weight file's name and size
    (cheap; a checksum of hundreds of GB is not)."""
    root = Path(path)
    h = hashlib.sha256()
    try:
        h.update(json.dumps(json.loads((root / "config.json").read_text()), sort_keys=True).encode())
    except (OSError, ValueError):
        h.update(b"no-config")
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def template_hash(path: str) -> str:
    try:
        template = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("chat_template") or ""
    except (OSError, ValueError, AttributeError):
        template = ""
    return hashlib.sha256(str(template).encode()).hexdigest()[:12]
