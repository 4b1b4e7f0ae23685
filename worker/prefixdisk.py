"""Hot prefixes on disk, so the next turn of a long conversation stays fast after the worker dies (a
crash, a restart, a rollback to the same weights). One file per entry (worker.prefixfile: mlx-lm's
prompt-cache format, read and written through the directory's descriptor), written by a background
thread after the main thread has evaluated the arrays (the thread only hashes and copies bytes),
atomically (a temp file, then rename), 0600 in a 0700 directory: they hold conversation text.

Nothing in the directory is trusted. Each file's metadata names what its KV is valid for: the
weights' identity (the supervisor's snapshot fingerprint plus the shards' sizes and mtimes), the mlx
and mlx-lm versions, and the token sequence itself; its arrays must fit the model's cache layout and
match their checksum. Only regular files are opened, never through a link. A file that fails any of
this is deleted (a link itself, never what it points to) with a log event and never used, and costs
only itself: the request that would have used it prefills in full. The directory is bounded by a byte
budget: the least recently used files go first.

A clear (lmxctl cache clear) is a barrier: a write under way finishes first and is removed with the
rest, writes still queued are forgotten, and the writer never lands anything from before the clear
after it (the supervisor removes the directory before it tells the worker; writes then go to a new
one)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import prefixfile
from worker.log import log
from worker.prefixcache import usable_prefix
from worker.prefixfile import Layout, Untrusted

FORMAT = "lmx-prefix-2"  # 2: the arrays' checksum; a file of 1 is dropped as an unknown format
# Entries shorter than this are cheap to prefill again: not worth a file.
MIN_TOKENS = 256
_PENDING_MAX = 8  # writes waiting for the thread; beyond this the oldest is dropped (it was hot once)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    trimmable: bool
    name: str  # the file's name in the directory
    nbytes: int
    used_at: float


def _name(tokens: list[int] | tuple) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:32]


class PrefixDisk:
    def __init__(self, directory: str, budget_bytes: int, identity: dict[str, str], model: Any) -> None:
        self._path = Path(directory)
        self._budget = budget_bytes
        self._identity = identity
        self._layout: Layout = prefixfile.model_layout(model)  # what every file's arrays must fit
        self._lock = threading.Lock()  # the index: main, writer and IO (stats) threads
        self._writing = threading.Lock()  # held for each whole write, and by a clear: the barrier
        self._epoch = 0  # clears so far: a write queued before one is never made
        self._index: dict[str, _Entry] = {}
        self.writes = 0
        self._pending: queue.Queue = queue.Queue()
        self._dfd = self._open_dir()
        self._scan()
        threading.Thread(target=self._writer, name="lmx-prefix-writer", daemon=True).start()

    def _open_dir(self) -> int:
        self._path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path, _DIR_FLAGS)  # a link in its place is refused (ELOOP)
        os.fchmod(fd, 0o700)
        return fd

    # --- reading ------------------------------------------------------------------------------

    def _scan(self) -> None:
        for name in sorted(os.listdir(self._dfd)):
            if not name.endswith(".safetensors"):
                continue
            try:
                what = prefixfile.special(os.stat(name, dir_fd=self._dfd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            if what:
                self._drop(name, f"{what}, not a regular file", directory=what == "a directory")
            elif name.startswith(".tmp-"):
                self._unlink(name)  # a write that a crash cut short
            else:
                self._index_file(name)
        if self._index:
            log("worker.prefix_cache_found", entries=len(self._index), bytes=self._bytes())

    def _index_file(self, name: str) -> None:
        try:
            with prefixfile.open_regular(name, self._dfd) as f:
                header = prefixfile.read_header(f)
                st = os.fstat(f.fileno())
            meta = prefixfile.own_metadata(header)
            tokens = tuple(json.loads(meta["tokens"]))
            why = self._mismatch(meta, tokens, name) or self._fits(header)
        except Untrusted as exc:
            why = str(exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"unreadable: {exc}"
        if why:
            self._drop(name, why)
            return
        self._index[name] = _Entry(tokens, meta.get("trimmable") == "1", name, st.st_size, st.st_mtime)

    def _fits(self, header: dict[str, Any]) -> str | None:
        try:
            prefixfile.check_header(header, self._layout)
        except (Untrusted, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"does not fit the model: {exc}"
        return None

    def _mismatch(self, meta: dict[str, str], tokens: tuple, name: str) -> str | None:
        if meta.get("format") != FORMAT:
            return "unknown format"
        for key, want in self._identity.items():
            if meta.get(key) != want:
                return f"{key} differs"
        if f"{_name(tokens)}.safetensors" != name:
            return "tokens do not match the file name"
        return None

    def _drop(self, name: str, why: str, directory: bool = False) -> None:
        removed = self._unlink(name, directory)
        log("worker.prefix_cache_dropped", level="warning", file=name, reason=why, removed=removed)

    def _unlink(self, name: str, directory: bool = False, dfd: int | None = None) -> bool:
        """Remove `name` from the directory: a link itself, never what it points to; a directory
        only if empty."""
        try:
            (os.rmdir if directory else os.unlink)(name, dir_fd=self._dfd if dfd is None else dfd)
        except OSError:
            return False
        return True

    def best(self, tokens: list[int]) -> int:
        """How many of `tokens` the best file on disk could serve."""
        with self._lock:
            entries = list(self._index.values())
        return max((usable_prefix(e.tokens, tokens, e.trimmable) for e in entries), default=0)

    def load_best(self, tokens: list[int]) -> tuple[list[int], list] | None:
        """(its tokens, its cache) for the best file, read and checked now; None (and the file
        dropped) if it cannot be used."""
        with self._lock:
            entries = list(self._index.values())
        if not entries:
            return None
        entry = max(entries, key=lambda e: usable_prefix(e.tokens, tokens, e.trimmable))
        start = time.monotonic()
        try:
            cache, hash_s = self._load(entry)
        except Exception as exc:  # corrupt, truncated, replaced, foreign: never used
            with self._lock:
                self._index.pop(entry.name, None)
            self._drop(entry.name, f"cannot load: {exc}")
            return None
        entry.used_at = time.time()
        try:
            os.utime(entry.name, dir_fd=self._dfd, follow_symlinks=False)  # the last to go when the budget bites
        except (OSError, NotImplementedError):
            pass
        log("worker.prefix_cache_loaded", tokens=len(entry.tokens), bytes=entry.nbytes,
            load_s=round(time.monotonic() - start, 4), checksum_s=round(hash_s, 4))
        return list(entry.tokens), cache

    def _load(self, entry: _Entry) -> tuple[list, float]:
        with prefixfile.open_regular(entry.name, self._dfd) as f:
            header = prefixfile.read_header(f)
            meta = prefixfile.own_metadata(header)
            if self._mismatch(meta, entry.tokens, entry.name) or json.loads(meta["tokens"]) != list(entry.tokens):
                raise Untrusted("metadata changed since the scan")
            why = self._fits(header)
            if why:
                raise Untrusted(why)
            f.seek(0)
            cache, _, hash_s = prefixfile.load(f, self._layout, len(entry.tokens))
        return cache, hash_s

    # --- writing ------------------------------------------------------------------------------

    def save(self, tokens: list[int], cache: list) -> None:
        """Queue `cache` (the KV of `tokens`) for the writer thread. The arrays are evaluated here, on
        the main thread, so that the thread only hashes and copies bytes."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        if len(tokens) < MIN_TOKENS or self._budget <= 0 or f"{_name(tokens)}.safetensors" in self._index:
            return
        entry = prefixfile.prepare(cache)
        while self._pending.qsize() >= _PENDING_MAX:
            try:
                self._pending.get_nowait()
            except queue.Empty:
                break
        self._pending.put((self._epoch, list(tokens), entry, can_trim_prompt_cache(cache)))

    def _writer(self) -> None:
        while True:
            epoch, tokens, entry, trimmable = self._pending.get()
            with self._writing:
                if epoch != self._epoch:
                    continue  # queued before a clear: forgotten
                try:
                    self._write(tokens, entry, trimmable)
                except FileNotFoundError as exc:  # the directory was removed: never made again from here
                    log("worker.prefix_cache_write_failed", level="info", error=repr(exc),
                        hint="the cache directory is gone: a clear is on its way, or it was removed by hand "
                             "(lmxctl cache clear or a restart makes a new one)")
                except Exception as exc:  # a full or read-only disk costs the entry, not the worker
                    log("worker.prefix_cache_write_failed", level="warning", error=repr(exc))

    def _write(self, tokens: list[int], entry: prefixfile.Prepared, trimmable: bool) -> None:
        start = time.monotonic()
        name = _name(tokens)
        final, tmp = f"{name}.safetensors", f".tmp-{name}-{os.getpid()}.safetensors"
        meta = {"format": FORMAT, "tokens": json.dumps(tokens), "trimmable": "1" if trimmable else "0",
                **self._identity}
        self._unlink(tmp)  # never written through: whatever is in its place goes
        try:
            with prefixfile.create(tmp, self._dfd) as f:
                hash_s = prefixfile.write(f, entry, meta)
                f.flush()
                size = os.fstat(f.fileno()).st_size
            os.replace(tmp, final, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        finally:
            self._unlink(tmp)
        with self._lock:
            self._index[final] = _Entry(tuple(tokens), trimmable, final, size, time.time())
            superseded = [e for k, e in self._index.items() if k != final and e.trimmable and trimmable
                          and len(e.tokens) < len(tokens) and tuple(tokens[:len(e.tokens)]) == e.tokens]
            for e in superseded:
                del self._index[e.name]
            self.writes += 1
        for e in superseded:
            self._unlink(e.name)
        self._enforce_budget()
        log("worker.prefix_cache_saved", tokens=len(tokens), bytes=size, file=final,
            write_s=round(time.monotonic() - start, 4), checksum_s=round(hash_s, 4))

    def _enforce_budget(self) -> None:
        with self._lock:
            gone = []
            while self._bytes() > self._budget and self._index:
                oldest = min(self._index.values(), key=lambda e: e.used_at)
                gone.append(self._index.pop(oldest.name))
        for e in gone:
            self._unlink(e.name)
            log("worker.prefix_cache_evicted", file=e.name, bytes=e.nbytes, where="disk")

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    def clear(self) -> int:
        """Forget every entry, on disk and queued, as a barrier: a write under way finishes first and
        is removed with the rest; nothing queued before this is ever written. Writes from now on go
        to a fresh directory (the supervisor removed the old one before it told us). Returns how many
        queued writes were forgotten."""
        with self._writing:
            self._epoch += 1
            forgotten = 0
            while True:
                try:
                    self._pending.get_nowait()
                except queue.Empty:
                    break
                forgotten += 1
            with self._lock:
                entries, self._index = list(self._index.values()), {}
            for e in entries:
                self._unlink(e.name)
            try:
                fresh = self._open_dir()
            except OSError as exc:  # an unwritable state dir costs persistence, not serving
                log("worker.prefix_cache_disk_unusable", level="warning", error=repr(exc))
            else:
                os.close(self._dfd)
                self._dfd = fresh
        return forgotten

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"disk_entries": len(self._index), "disk_bytes": self._bytes(), "disk_writes": self.writes}
