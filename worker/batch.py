"""Continuous batching in the worker with mlx-lm's own BatchGenerator: requests join the running batch
between decode steps, each streams its own tokens and ends on its own stop condition (EOS, max_tokens,
a stop string), with its own sampler. A cancel removes its sequence before the next step. Prompt work
is bounded per step (prefill_step_size tokens), so a long prompt cannot starve running streams.

A request that arrives to an idle worker runs alone on mlx-lm's generate_step (the path of
stream_generate, whose pipelining a batch of one cannot match); when a second request arrives, the
solo sequence moves into the batch with its KV cache (less its last token, which the batch re-feeds)
and nothing is recomputed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.errors import ErrorCode
from protocol.messages import Chunk, Chunks, Error, Final, GenerateRequest, Message
from worker.channel import Progress
from worker import sampling
from worker.engine import Engine, find_stop, stop_holdback
from worker.pacing import Pacer


@dataclass
class _Solo:
    """The one request running on generate_step, with the cache it fills."""
    req: GenerateRequest
    tokens_gen: Any
    cache: list
    sampler: Any
    last_token: int | None = None
    yielded: int = 0


@dataclass
class _Stream:
    req: GenerateRequest
    detok: Any
    prompt_tokens: int
    start: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    text: str = ""
    emitted: int = 0
    tokens: int = 0


class Batcher:
    def __init__(self, engine: Engine, progress: Progress, send: Callable[[Message], None],
                 max_batch_size: int, prefill_step_size: int, stream_interval_s: float) -> None:
        self._engine = engine
        self._progress = progress
        self._send = send
        self._max = max_batch_size
        self._prefill_step = prefill_step_size
        self._streams: dict[int, _Stream] = {}
        # Chunks not sent yet: request id -> [request_id, text, tokens], merged per stream.
        self._out: dict[str, list] = {}
        self._first: set[str] = set()  # streams whose first chunk is waiting: never held back
        self._pacer = Pacer(stream_interval_s)
        self._step_s = 0.0  # how long the last step took: what the next is expected to take
        self._uids: dict[str, int] = {}  # request id -> BatchGenerator uid (or the solo's -1)
        self._gen = self._new_generator()
        self._solo: _Solo | None = None
        self._eos = set(engine.tokenizer.eos_token_ids)
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self._solo_ok = can_trim_prompt_cache(make_prompt_cache(engine.model))

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        tok = self._engine.tokenizer
        return BatchGenerator(self._engine.model, stop_tokens=[[t] for t in tok.eos_token_ids],
                              completion_batch_size=self._max, prefill_batch_size=min(self._max, 8),
                              prefill_step_size=self._prefill_step)

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, req: GenerateRequest) -> None:
        try:
            prompt = self._engine.prompt_tokens(req)
            if not prompt:
                raise ValueError("the prompt is empty")
            sampler = sampling.make(req.temperature, req.top_p)
            if self._solo_ok and not self._streams and req.max_tokens > 1:
                self._start_solo(req, prompt, sampler)
                return
            if self._solo is not None:
                self._solo_to_batch()
            (uid,) = self._gen.insert([prompt], [req.max_tokens], samplers=[sampler])
        except Exception as exc:  # this request's input is unusable; the batch goes on
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot start generation: {exc}"))
            return
        self._streams[uid] = _Stream(req, self._engine.tokenizer.detokenizer, len(prompt))
        self._uids[req.request_id] = uid
        self._first.add(req.request_id)

    # --- a request alone: generate_step, then into the batch when company comes --------------

    _SOLO = -1  # the solo stream's key in _streams

    def _start_solo(self, req: GenerateRequest, prompt: list[int], sampler: Any) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        if req.seed is not None:
            mx.random.seed(req.seed)  # alone, a seed gives the exact sequence
        cache = make_prompt_cache(self._engine.model)
        tokens_gen = generate_step(mx.array(prompt), self._engine.model, prompt_cache=cache, sampler=sampler,
                                   max_tokens=req.max_tokens, prefill_step_size=self._prefill_step)
        self._solo = _Solo(req, tokens_gen, cache, sampler)
        self._streams[self._SOLO] = _Stream(req, self._engine.tokenizer.detokenizer, len(prompt))
        self._uids[req.request_id] = self._SOLO
        self._first.add(req.request_id)

    def _solo_step(self) -> None:
        solo = self._solo
        assert solo is not None
        token, _ = next(solo.tokens_gen)
        solo.last_token, solo.yielded = token, solo.yielded + 1
        reason = "stop" if token in self._eos else ("length" if solo.yielded >= solo.req.max_tokens else None)
        if reason is not None:
            self._drop_solo()
        self._on_token(self._SOLO, self._streams[self._SOLO], token, reason, time.monotonic())

    def _drop_solo(self) -> None:
        if self._solo is not None:
            self._solo.tokens_gen.close()
            self._solo = None

    def _solo_to_batch(self) -> None:
        """The solo sequence joins the batch: its cache less the last token, which the batch feeds
        next (generate_step had already fed it). Nothing is recomputed."""
        from mlx_lm.models.cache import trim_prompt_cache

        solo, stream = self._solo, self._streams.pop(self._SOLO)
        assert solo is not None
        self._drop_solo()
        if solo.yielded == 0:  # nothing generated yet: start it in the batch from its prompt
            uid_prompt, cache = self._engine.prompt_tokens(solo.req), None
        else:
            trim_prompt_cache(solo.cache, 1)
            uid_prompt, cache = [solo.last_token], solo.cache
        (uid,) = self._gen.insert([uid_prompt], [solo.req.max_tokens - solo.yielded],
                                  caches=[cache] if cache is not None else None, samplers=[solo.sampler])
        self._streams[uid] = stream
        self._uids[solo.req.request_id] = uid

    def cancel(self, request_id: str) -> None:
        uid = self._uids.pop(request_id, None)
        if uid is None:
            return  # finished already: its Final is on the wire
        if uid == self._SOLO:
            self._drop_solo()
        else:
            self._gen.remove([uid])
        del self._streams[uid]
        self._out.pop(request_id, None)  # its client is gone: what it had not been sent stays here
        self._first.discard(request_id)
        self._send(Error(request_id, ErrorCode.CANCELLED.code, "cancelled by client"))

    def cancel_all(self) -> None:
        for rid in list(self._uids):
            self.cancel(rid)

    def step(self) -> None:
        """One BatchGenerator step: a decode step for running streams and a bounded slice of prompt
        work for new ones. Fails the whole batch (not the worker) if mlx raises."""
        progress = self._progress
        start = time.monotonic()
        if self._solo is not None:
            try:
                self._solo_step()
            except Exception as exc:
                self._fail_all(exc)
                return
            self._step_s = time.monotonic() - start
            self._flush(step_end=True)
            progress.count += 1
            progress.phase = "decode" if self._streams else "idle"
            return
        try:
            prompt_responses, responses = self._gen.next()
        except Exception as exc:
            self._fail_all(exc)
            return
        progress.count += 1
        progress.phase = "decode" if responses or not prompt_responses else "prefill"
        now = time.monotonic()
        self._step_s = now - start
        for r in responses:
            s = self._streams.get(r.uid)
            if s is not None:
                self._on_token(r.uid, s, r.token, r.finish_reason, now)
        self._flush(step_end=True)
        if not self._streams:
            progress.phase = "idle"

    def _on_token(self, uid: int, s: _Stream, token: int, finish_reason: str | None, now: float) -> None:
        if s.first_token_s is None:
            s.first_token_s = now - s.start
        real = finish_reason != "stop"  # "stop": the EOS token itself, never shown
        if real:
            s.detok.add_token(token)
            s.tokens += 1
        if finish_reason is not None:
            s.detok.finalize()
        s.text += s.detok.last_segment
        rid = s.req.request_id
        cut = find_stop(s.text, s.req.stop, s.emitted)
        if cut is not None:
            s.text = s.text[:cut]
            self._chunk(rid, s.text[s.emitted:], int(real))
            s.emitted = len(s.text)
            if uid == self._SOLO:
                self._drop_solo()
            else:
                self._gen.remove([uid])
            self._finish(uid, s, "stop", now)
            return
        safe = len(s.text) if finish_reason else len(s.text) - stop_holdback(s.text, s.req.stop)
        if real or safe > s.emitted:
            self._chunk(rid, s.text[s.emitted:safe], int(real))
            s.emitted = max(s.emitted, safe)
        if finish_reason is not None:
            self._finish(uid, s, finish_reason, now)

    def _chunk(self, rid: str, text: str, tokens: int) -> None:
        if not (text or tokens):
            return
        held = self._out.get(rid)
        if held is None:
            self._out[rid] = [rid, text, tokens]
        else:
            held[1] += text
            held[2] += tokens

    def _flush(self, step_end: bool = False) -> None:
        """Chunks go out as one message for the whole batch, not one per stream. At a step's end
        they may wait for the next steps' (worker.pacing), except a stream's first. Anything else
        sent flushes first, so a stream's last chunk precedes its final."""
        if not self._out:
            return
        now = time.monotonic()
        if step_end and self._pacer.hold(now, self._step_s) and not self._first.intersection(self._out):
            return
        out = list(self._out.values())
        self._out.clear()
        self._first.difference_update(r[0] for r in out)
        self._pacer.sent(now)
        self._send(Chunk(*out[0]) if len(out) == 1 else Chunks(out))

    def _finish(self, uid: int, s: _Stream, reason: str, now: float) -> None:
        del self._streams[uid]
        self._uids.pop(s.req.request_id, None)
        total = now - s.start
        first = s.first_token_s or total
        timings = {"first_token_s": first, "total_s": total,
                   "decode_tokens_per_s": (s.tokens - 1) / (total - first) if s.tokens > 1 and total > first else 0.0}
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.tokens}
        self._flush()
        self._send(Final(s.req.request_id, s.text, reason, usage, timings))

    def _fail_all(self, exc: Exception) -> None:
        from worker.log import log

        log("worker.batch_failed", level="error", error=repr(exc), requests=len(self._streams))
        self._flush()
        for s in self._streams.values():
            self._send(Error(s.req.request_id, ErrorCode.INTERNAL.code, f"generation failed: {exc!r}"))
        self._streams.clear()
        self._uids.clear()
        self._first.clear()
        self._drop_solo()
        self._gen = self._new_generator()
        self._progress.phase = "idle"
