"""The worker's prefix KV cache: a request whose prompt shares a prefix with KV state the worker holds
starts from that state and prefills only the rest. Built on mlx-lm's own LRUPromptCache (a trie of
token sequences, deep copies out, trimming of trimmable caches, prefixes superseded by longer
entries dropped), under a byte budget this module enforces and counts.

Per cache type (what `make_prompt_cache` gives the model):
- KVCache (most models): any common prefix is reused; a longer entry is copied and trimmed back.
- RotatingKVCache (sliding-window models) and ArraysCache / hybrid SSM caches cannot be trimmed
  (once they wrapped, or ever): only an entry that is a whole prefix of the prompt is reused. For
  these, worker.checkpoint stores the cache at the end of each prompt (all of it but its last
  token), which the next turn of a chat extends; when the budget bites, finished generations'
  entries (which such a prompt rarely extends) go before checkpoints.
An entry is written only from KV that is complete: a prompt-end checkpoint, or the KV a finished
request (stop or length) left behind: a cancelled, timed-out or failed request leaves nothing
half-written."""

from __future__ import annotations

from typing import Any, Callable

# How many more tokens a disk entry must cover than the best one in memory before it is worth a
# load from disk (a file read costs more than prefilling a handful of tokens).
DISK_MIN_GAIN_TOKENS = 32
# LRUPromptCache's entry kinds, in its eviction order: the least recently used finished generation
# goes first while there are as many of them as checkpoints (mlx_lm.server's "assistant" / "user").
_FINISHED, _PROMPT_END = "assistant", "user"


class PrefixCache:
    def __init__(self, key: str, budget_bytes: int, disk: Any = None,
                 memory_room: Callable[[int], bool] | None = None) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self._key = key  # one worker serves one revision: entries never cross models or revisions
        self.budget_bytes = budget_bytes
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=1 << 62)  # the budget is enforced here
        self._disk = disk
        self._memory_room = memory_room or (lambda nbytes: True)
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.evictions = 0
        self.clears = 0  # how many clears so far: a generation running across one stores nothing

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def fetch(self, tokens: list[int]) -> tuple[list | None, list[int]]:
        """(a cache of this request's own holding the longest reusable prefix, or None; the tokens
        still to prefill). At least one token is always left to feed."""
        if not self.enabled:
            self.miss_tokens += len(tokens)
            return None, tokens
        cache, rest = self._lru.fetch_nearest_cache(self._key, tokens)
        if self._disk is not None and self._disk.best(tokens) > len(tokens) - len(rest) + DISK_MIN_GAIN_TOKENS:
            loaded = self._disk.load_best(tokens)
            if loaded is not None:
                self._insert(*loaded)
                cache, rest = self._lru.fetch_nearest_cache(self._key, tokens)
        if cache is not None and not rest:  # the whole prompt is cached: feed its last token again
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:  # the longest entry short of the last token (a checkpoint of the prompt it extends)
                cache, rest = self._lru.fetch_nearest_cache(self._key, tokens[:-1])
                rest = [*rest, tokens[-1]] if cache is not None else tokens
        self.hit_tokens += len(tokens) - len(rest)
        self.miss_tokens += len(rest)
        return cache, list(rest)

    def store(self, tokens: list[int], cache: list, shared: bool = False) -> None:
        """After a finished generation: `cache` holds the KV of exactly `tokens` (prompt and output).
        `shared`: its arrays are slices of a batch's buffers (BatchGenerator's extraction), which
        would keep the whole batch's KV alive behind an entry that counts only its own bytes."""
        self._keep(tokens, cache, shared, _FINISHED)

    def checkpoint(self, tokens: list[int], cache: list, shared: bool = False) -> None:
        """A prompt's end (worker.checkpoint), for a cache that cannot be trimmed back: `cache` holds
        the KV of exactly `tokens`. Kept over finished generations' entries when the budget bites."""
        self._keep(tokens, cache, shared, _PROMPT_END)

    def _keep(self, tokens: list[int], cache: list, shared: bool, kind: str) -> None:
        if not self.enabled or not tokens or not cache:
            return
        if shared:
            compact(cache)
        if not self.room_for(sum(c.nbytes for c in cache)):
            return
        self._insert(tokens, cache, kind)
        if self._disk is not None:
            self._disk.save(tokens, cache)

    def room_for(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` may be kept (within the budget and the memory limit)."""
        return self.enabled and nbytes <= self.budget_bytes and self._memory_room(nbytes)

    def _insert(self, tokens: list[int], cache: list, kind: str = _FINISHED) -> None:
        self._lru.insert_cache(self._key, list(tokens), cache, cache_type=kind)
        while self._lru.nbytes > self.budget_bytes and len(self._lru):
            self._lru.trim_to(n_sequences=len(self._lru) - 1)  # drops the least recently used
            self.evictions += 1

    def clear(self) -> dict[str, int]:
        """lmxctl cache clear: every entry goes, in memory and on disk (worker.prefixdisk's barrier:
        nothing queued for the disk before this lands after it). What was forgotten."""
        out = {"entries": len(self._lru)}
        self.clears += 1
        self._lru.trim_to(n_sequences=0)
        if self._disk is not None:
            out["queued_writes"] = self._disk.clear()
        return out

    def stats(self) -> dict[str, int]:
        """For heartbeats (read from the IO thread: plain ints and a dict copy)."""
        out = {"budget_bytes": self.budget_bytes, "bytes": self._lru.nbytes, "entries": len(self._lru),
               "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens, "evictions": self.evictions}
        if self._disk is not None:
            out.update(self._disk.stats())
        return out


def compact(cache: list) -> None:
    """Give each layer's arrays buffers of their own, exactly as long as their content."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.cache import KVCache

    for c in cache:
        if type(c) is KVCache:
            if c.keys is not None:
                c.keys = mx.contiguous(c.keys[..., :c.offset, :])
                c.values = mx.contiguous(c.values[..., :c.offset, :])
        else:
            c.state = tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a, c.state)
    mx.eval([a for _, a in tree_flatten([c.state for c in cache]) if isinstance(a, mx.array)])


def usable_prefix(stored: list[int] | tuple, tokens: list[int], trimmable: bool) -> int:
    """How many of `tokens` an entry holding `stored` can serve: the common prefix when its cache
    can be trimmed back to it, else all of `stored` when it is a whole prefix of `tokens`, else 0."""
    import numpy as np

    n = min(len(stored), len(tokens))
    if n == 0:
        return 0
    a, b = np.asarray(stored[:n]), np.asarray(tokens[:n])
    diff = np.flatnonzero(a != b)
    common = int(diff[0]) if diff.size else n
    if trimmable:
        return common
    return len(stored) if common == len(stored) else 0
