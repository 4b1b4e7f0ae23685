"""Prompt-end checkpoints: the prefix cache's entries for models whose caches cannot be trimmed back
(a sliding window, RotatingKVCache, once it has wrapped: gemma3, gpt_oss; a recurrent state,
ArraysCache: qwen3_next, qwen3_5). Such an entry serves a prompt only when it is a whole prefix of
it (worker.prefixcache.usable_prefix), and the KV a finished generation leaves (prompt and output)
rarely is: the chat template renders the answer again, drops its think block, adds end tokens. The
prompt itself is: the next turn of a chat extends it. So the cache state at the end of the prompt,
before the last prompt token (the one the first sampled token comes from), is kept as the entry, as
mlx_lm.server keeps one at each segment's end.

- Alone (worker.solo): where generate_step would start on the prompt's last chunk, that chunk but its
  last token is fed here instead (generate_step feeds the same tokens in the same two calls: the
  output is the same), the cache copied and stored; generate_step starts on the last token.
- In the batch: BatchGenerator prefills a prompt as two segments (all but the last token, then the
  last token); where the first ends (a prompt response with end_of_segment and not end_of_prompt)
  the sequence's cache is extracted (its own copy of the batch's rows) and stored.

A checkpoint is taken with the prompt fully prefilled (never a half-written one) but kept with its
request and stored only when that request finishes (stop or length), as the finished entry is: an
abandoned request (cancelled, past its deadline, failed) stores nothing. Its bytes count in the
budget once, as any entry's. The finished
generation's entry is stored as before: one that can still be trimmed back serves every prefix of
itself and replaces the checkpoint (LRUPromptCache drops the prefixes of a trimmable entry); one
that cannot is kept too (a raw completion that continues the answer extends it), but when the
budget bites, finished entries go before checkpoints (worker.prefixcache: mlx_lm.server's order)."""

from __future__ import annotations

import copy
import time
from typing import Any

from worker import prefill
from worker.prefixcache import PrefixCache

# Caches that can always be trimmed back to any prefix: the finished entry serves the next turn.
_TRIMMABLE = frozenset({"KVCache", "QuantizedKVCache", "ConcatenateKVCache"})


def needed(model: Any) -> bool:
    """Whether the model's cache has a layer that cannot always be trimmed back."""
    from mlx_lm.models.cache import make_prompt_cache

    return any(type(c).__name__ not in _TRIMMABLE for c in make_prompt_cache(model))


class Checkpoints:
    def __init__(self, model: Any, prefix: PrefixCache) -> None:
        self._model = model
        self._prefix = prefix
        self.wanted = needed(model)
        self.stored = 0  # checkpoints stored so far

    def solo(self, chunks: prefill.ChunkSize, solo: Any, stream: Any) -> bool:
        """Before generate_step starts on a lone request (worker.prefill.next_chunk's last chunk):
        feed that chunk but its last token and store the cache there. True when it did (this
        step's prompt work); generate_step then starts on the last token alone."""
        if not (self.wanted and self._prefix.enabled) or solo.tokens_gen is not None:
            return False
        if not 1 < len(solo.rest) <= chunks.n + 1:  # more chunks first, or only the last token left
            return False
        began = time.monotonic()
        prefill.run_chunk(self._model, solo.cache, solo.rest[:-1])
        chunks.took(len(solo.rest) - 1, time.monotonic() - began)
        solo.rest = solo.rest[-1:]
        if self._prefix.room_for(sum(c.nbytes for c in solo.cache)):  # before the copy, not after it
            self._store(stream, stream.prompt[:-1], copy.deepcopy(solo.cache), shared=False)
        return True

    def batch(self, gen: Any, prompts: list, streams: dict[int, Any]) -> None:
        """After a BatchGenerator step: store the cache of each sequence whose prompt but its last
        token the step finished prefilling."""
        if not (self.wanted and self._prefix.enabled):
            return
        ends = [p.uid for p in prompts if p.end_of_segment and not p.end_of_prompt and p.uid in streams]
        if not ends:
            return
        for uid, (cache, tokens) in gen.extract_cache(ends).items():
            stream = streams[uid]
            if list(tokens) == stream.prompt[:-1]:  # the segment BatchGenerator made of it, as it should be
                self._store(stream, list(tokens), cache, shared=True)

    def _store(self, stream: Any, tokens: list[int], cache: list, shared: bool) -> None:
        stream.checkpoint = (tokens, cache, shared)  # stored if it finishes (commit), dropped with it if not

    def commit(self, stream: Any) -> None:
        """A request finished: its checkpoint, if it took one, becomes an entry (unless a clear came since)."""
        kept, stream.checkpoint = stream.checkpoint, None
        if kept is None or stream.prefix_clears != self._prefix.clears:  # a clear since it started: nothing of before
            return
        tokens, cache, shared = kept
        self._prefix.checkpoint(tokens, cache, shared=shared)
        self.stored += 1
