"""The supervisor's side of the workers' prefix KV caches (worker.prefixcache): what each may hold in
memory and on disk, which weights a file on disk is valid for, and clearing them. The supervisor
never reads the files; it only names the directory and removes it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from supervisor.admission import compat
from supervisor.admission.memory import estimate
from supervisor.config import ModelConfig

AUTO = -1
AUTO_CONTEXTS = 2  # auto memory budget: the KV of this many full contexts (context_tokens each)
AUTO_DISK_FACTOR = 4  # auto disk budget: this many times the memory budget


def budget_bytes(model: ModelConfig) -> int:
    if model.prefix_cache_bytes != AUTO:
        return model.prefix_cache_bytes
    return AUTO_CONTEXTS * estimate(model.path, model.context_tokens)["kv_cache"]


def disk_budget_bytes(model: ModelConfig) -> int:
    if not model.prefix_cache_persist:
        return 0
    if model.prefix_cache_disk_bytes != AUTO:
        return model.prefix_cache_disk_bytes
    return AUTO_DISK_FACTOR * budget_bytes(model)


def weights_key(path: str) -> str:
    """The weights themselves, not the config revision (a canary tweak keeps the files valid): the
    registry's snapshot fingerprint plus every weight file's size and mtime, so a repaired or
    replaced shard makes every file of the old weights unusable."""
    h = hashlib.sha256(compat.fingerprint(path).encode())
    for f in sorted(Path(path).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


class OutsideCache(OSError):
    """A model's cache directory would not be a directory right under the state dir's prefix-cache
    (an OSError: at a worker's start it costs persistence, never the model)."""


def directory(state_dir: Path, model_id: str) -> Path:
    """STATE_DIR/prefix-cache/MODEL, proven to stay there: the config checks every id (a safe path
    component), and this checks again what a path made of it resolves to, since a delete follows."""
    root = (state_dir / "prefix-cache").resolve()
    d = root / model_id
    if model_id in ("", ".", "..") or d.parent != root or d.resolve().parent != root:
        raise OutsideCache(f"model id {model_id!r} does not name a directory inside {root}")
    return d


def init_fields(model: ModelConfig, state_dir: Path | None) -> dict[str, Any]:
    """The Init fields that configure a worker's prefix cache."""
    budget = budget_bytes(model)
    disk = disk_budget_bytes(model) if state_dir is not None and budget > 0 else 0
    fields: dict[str, Any] = {"prefix_cache_bytes": budget, "prefix_cache_disk_bytes": disk}
    if disk > 0:
        d = directory(state_dir, model.id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        d.parent.chmod(0o700)
        fields.update(prefix_cache_dir=str(d), weights_key=weights_key(model.path))
    return fields


def clear(state_dir: Path, model_id: str | None) -> dict[str, int]:
    """Remove the files of one model (or of all): what was removed."""
    root = state_dir / "prefix-cache"
    if model_id:
        dirs = [directory(state_dir, model_id)]
    else:  # a link is never followed (nor removed: rmtree refuses links)
        dirs = [directory(state_dir, d.name) for d in root.glob("*") if d.is_dir() and not d.is_symlink()]
    files = size = 0
    for d in dirs:
        if d.is_symlink() or not d.is_dir():
            continue
        for f in d.glob("*.safetensors"):
            try:
                size += f.stat().st_size
                files += 1
            except OSError:
                pass
        _remove(d)
    return {"files": files, "bytes": size}


def _remove(d: Path) -> None:
    """`d` and all in it, gone when this returns. A worker's write that lands while rmtree lists the
    directory leaves it behind: again. Once it is gone, a write through the worker's descriptor of
    it fails (worker.prefixdisk), so nothing from before a clear lands after it."""
    for _ in range(100):
        shutil.rmtree(d, ignore_errors=True)
        if not d.is_dir() or d.is_symlink():
            return


_COUNTERS = ("hit_tokens", "miss_tokens", "evictions")


class Totals:
    """Counters that outlive workers (a worker's own start at zero): every worker's last figures,
    summed, for Prometheus counters and status."""

    def __init__(self) -> None:
        self._done = dict.fromkeys(_COUNTERS, 0)  # workers gone
        self._pid: int | None = None
        self._last: dict[str, int] = {}

    def observe(self, pid: int | None, figures: dict[str, int]) -> dict[str, Any]:
        """Status's `prefix_cache`: the running worker's figures and the totals since start."""
        if pid != self._pid:
            for k in _COUNTERS:
                self._done[k] += self._last.get(k, 0)
            self._pid, self._last = pid, {}
        if figures:
            self._last = figures
        out: dict[str, Any] = dict(figures)
        for k in _COUNTERS:
            out[f"{k}_total"] = self._done[k] + self._last.get(k, 0)
        return out
