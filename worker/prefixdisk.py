"""Hot prefixes on disk, so the next turn of a long conversation stays fast after the worker dies (a
crash, a restart, a rollback to the same weights). Files are mlx-lm's own prompt-cache format
(`save_prompt_cache` / `load_prompt_cache`), one per entry, written by a background thread after
the main thread has evaluated the arrays (the thread only does file IO), atomically (a temp file,
then rename), 0600 in a 0700 directory: they hold conversation text.

Each file's metadata names what its KV is valid for: the weights' identity (the supervisor's
snapshot fingerprint plus the shards' sizes and mtimes), the mlx and mlx-lm versions, and the token
sequence itself. A file that does not match, or cannot be read, is deleted with a log event and never
used. The directory is bounded by a byte budget: the least recently used files go first."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker.log import log
from worker.prefixcache import usable_prefix

FORMAT = "lmx-prefix-1"
# Entries shorter than this are cheap to prefill again: not worth a file.
MIN_TOKENS = 256
_PENDING_MAX = 8  # writes waiting for the thread; beyond this the oldest is dropped (it was hot once)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    trimmable: bool
    path: Path
    nbytes: int
    used_at: float


def _name(tokens: list[int] | tuple) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:32]


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata, without reading the tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 64 * 2**20:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    # save_prompt_cache flattens [metadata, classes, scalars]: ours are the "0." keys.
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


class PrefixDisk:
    def __init__(self, directory: str, budget_bytes: int, identity: dict[str, str]) -> None:
        self._dir = Path(directory)
        self._budget = budget_bytes
        self._identity = identity
        self._lock = threading.Lock()
        self._index: dict[str, _Entry] = {}
        self.writes = 0
        self._pending: queue.Queue = queue.Queue()
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._dir, 0o700)
        self._scan()
        threading.Thread(target=self._writer, name="lmx-prefix-writer", daemon=True).start()

    # --- reading ------------------------------------------------------------------------------

    def _scan(self) -> None:
        for path in sorted(self._dir.glob("*.safetensors")):
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a write that a crash cut short
                continue
            try:
                meta = _read_metadata(path)
                tokens = tuple(json.loads(meta["tokens"]))
                why = self._mismatch(meta, tokens, path)
            except (OSError, ValueError, KeyError, struct.error) as exc:
                why = f"unreadable: {exc}"
            if why:
                self._drop(path, why)
                continue
            st = path.stat()
            self._index[path.stem] = _Entry(tokens, meta.get("trimmable") == "1", path, st.st_size, st.st_mtime)
        if self._index:
            log("worker.prefix_cache_found", entries=len(self._index), bytes=self._bytes())

    def _mismatch(self, meta: dict[str, str], tokens: tuple, path: Path) -> str | None:
        if meta.get("format") != FORMAT:
            return "unknown format"
        for key, want in self._identity.items():
            if meta.get(key) != want:
                return f"{key} differs"
        if _name(tokens) != path.stem:
            return "tokens do not match the file name"
        return None

    def _drop(self, path: Path, why: str) -> None:
        log("worker.prefix_cache_dropped", level="warning", file=path.name, reason=why)
        try:
            path.unlink()
        except OSError:
            pass

    def best(self, tokens: list[int]) -> int:
        """How many of `tokens` the best file on disk could serve."""
        with self._lock:
            entries = list(self._index.values())
        return max((usable_prefix(e.tokens, tokens, e.trimmable) for e in entries), default=0)

    def load_best(self, tokens: list[int]) -> tuple[list[int], list] | None:
        """(its tokens, its cache) for the best file, read now; None (and the file dropped) if it
        cannot be used."""
        from mlx_lm.models.cache import load_prompt_cache

        with self._lock:
            entries = list(self._index.values())
        if not entries:
            return None
        entry = max(entries, key=lambda e: usable_prefix(e.tokens, tokens, e.trimmable))
        start = time.monotonic()
        try:
            cache, meta = load_prompt_cache(str(entry.path), return_metadata=True)
            if self._mismatch(meta, tuple(json.loads(meta["tokens"])), entry.path):
                raise ValueError("metadata changed since the scan")
        except Exception as exc:  # corrupt, truncated, or replaced: never used
            with self._lock:
                self._index.pop(entry.path.stem, None)
            self._drop(entry.path, f"cannot load: {exc!r}")
            return None
        entry.used_at = time.time()
        try:
            os.utime(entry.path)  # most recently used: the last to go when the disk budget bites
        except OSError:
            pass
        log("worker.prefix_cache_loaded", tokens=len(entry.tokens), bytes=entry.nbytes,
            load_s=round(time.monotonic() - start, 4))
        return list(entry.tokens), cache

    # --- writing ------------------------------------------------------------------------------

    def save(self, tokens: list[int], cache: list) -> None:
        """Queue `cache` (the KV of `tokens`) for the writer thread. The arrays are evaluated here, on
        the main thread, so that the thread only copies bytes to a file."""
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import can_trim_prompt_cache

        if len(tokens) < MIN_TOKENS or self._budget <= 0 or _name(tokens) in self._index:
            return
        mx.eval([a for _, a in tree_flatten([c.state for c in cache]) if isinstance(a, mx.array)])
        while self._pending.qsize() >= _PENDING_MAX:
            try:
                self._pending.get_nowait()
            except queue.Empty:
                break
        self._pending.put((list(tokens), cache, can_trim_prompt_cache(cache)))

    def _writer(self) -> None:
        while True:
            tokens, cache, trimmable = self._pending.get()
            try:
                self._write(tokens, cache, trimmable)
            except Exception as exc:  # a full or read-only disk costs the entry, not the worker
                log("worker.prefix_cache_write_failed", level="warning", error=repr(exc))

    def _write(self, tokens: list[int], cache: list, trimmable: bool) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        start = time.monotonic()
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # an operator may have cleared it
        name = _name(tokens)
        final = self._dir / f"{name}.safetensors"
        tmp = self._dir / f".tmp-{name}-{os.getpid()}.safetensors"
        meta = {"format": FORMAT, "tokens": json.dumps(tokens), "trimmable": "1" if trimmable else "0",
                **self._identity}
        try:
            save_prompt_cache(str(tmp), cache, meta)
            os.chmod(tmp, 0o600)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        size = final.stat().st_size
        with self._lock:
            self._index[name] = _Entry(tuple(tokens), trimmable, final, size, time.time())
            superseded = [e for k, e in self._index.items() if k != name and e.trimmable and trimmable
                          and len(e.tokens) < len(tokens) and tuple(tokens[:len(e.tokens)]) == e.tokens]
            for e in superseded:
                del self._index[e.path.stem]
            self.writes += 1
        for e in superseded:
            e.path.unlink(missing_ok=True)
        self._enforce_budget()
        log("worker.prefix_cache_saved", tokens=len(tokens), bytes=size, file=final.name,
            write_s=round(time.monotonic() - start, 4))

    def _enforce_budget(self) -> None:
        with self._lock:
            gone = []
            while self._bytes() > self._budget and self._index:
                oldest = min(self._index.values(), key=lambda e: e.used_at)
                gone.append(self._index.pop(oldest.path.stem))
        for e in gone:
            e.path.unlink(missing_ok=True)
            log("worker.prefix_cache_evicted", file=e.path.name, bytes=e.nbytes, where="disk")

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    def clear(self) -> None:
        with self._lock:
            entries, self._index = list(self._index.values()), {}
        for e in entries:
            e.path.unlink(missing_ok=True)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"disk_entries": len(self._index), "disk_bytes": self._bytes(), "disk_writes": self.writes}
