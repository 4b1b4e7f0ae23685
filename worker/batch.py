"""Continuous batching in the worker with mlx-lm's own BatchGenerator: requests join the running batch
between decode steps, each streams its own tokens and ends on its own stop condition (EOS, max_tokens,
a stop string), with its own sampler. A cancel removes its sequence before the next step. Prompt work
is bounded per step (prefill_step_size tokens), so a long prompt cannot starve running streams."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.errors import ErrorCode
from protocol.messages import Chunk, Error, Final, GenerateRequest, Message
from worker.channel import Progress
from worker.engine import Engine, find_stop, stop_holdback


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
                 max_batch_size: int, prefill_step_size: int) -> None:
        self._engine = engine
        self._progress = progress
        self._send = send
        self._max = max_batch_size
        self._prefill_step = prefill_step_size
        self._streams: dict[int, _Stream] = {}
        self._uids: dict[str, int] = {}  # request id -> BatchGenerator uid
        self._gen = self._new_generator()

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        tok = self._engine.tokenizer
        return BatchGenerator(self._engine.model, stop_tokens=[[t] for t in tok.eos_token_ids],
                              completion_batch_size=self._max, prefill_batch_size=min(self._max, 8),
                              prefill_step_size=self._prefill_step)

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def full(self) -> bool:
        return len(self._streams) >= self._max

    def add(self, req: GenerateRequest) -> None:
        from mlx_lm.sample_utils import make_sampler

        try:
            prompt = self._engine.prompt_tokens(req)
            sampler = make_sampler(temp=req.temperature, top_p=req.top_p if req.top_p < 1.0 else 0.0)
            (uid,) = self._gen.insert([prompt], [req.max_tokens], samplers=[sampler])
        except Exception as exc:  # this request's input is unusable; the batch goes on
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot start generation: {exc}"))
            return
        self._streams[uid] = _Stream(req, self._engine.tokenizer.detokenizer, len(prompt))
        self._uids[req.request_id] = uid

    def cancel(self, request_id: str) -> None:
        uid = self._uids.pop(request_id, None)
        if uid is None:
            return  # finished already: its Final is on the wire
        self._gen.remove([uid])
        del self._streams[uid]
        self._send(Error(request_id, ErrorCode.CANCELLED.code, "cancelled by client"))

    def cancel_all(self) -> None:
        for rid in list(self._uids):
            self.cancel(rid)

    def step(self) -> None:
        """One BatchGenerator step: a decode step for running streams and a bounded slice of prompt
        work for new ones. Fails the whole batch (not the worker) if mlx raises."""
        progress = self._progress
        try:
            prompt_responses, responses = self._gen.next()
        except Exception as exc:
            self._fail_all(exc)
            return
        progress.count += 1
        progress.phase = "decode" if responses or not prompt_responses else "prefill"
        now = time.monotonic()
        for r in responses:
            s = self._streams.get(r.uid)
            if s is not None:
                self._on_token(r.uid, s, r.token, r.finish_reason, now)
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
        if text or tokens:
            self._send(Chunk(rid, text, tokens))

    def _finish(self, uid: int, s: _Stream, reason: str, now: float) -> None:
        del self._streams[uid]
        self._uids.pop(s.req.request_id, None)
        total = now - s.start
        first = s.first_token_s or total
        timings = {"first_token_s": first, "total_s": total,
                   "decode_tokens_per_s": (s.tokens - 1) / (total - first) if s.tokens > 1 and total > first else 0.0}
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.tokens}
        self._send(Final(s.req.request_id, s.text, reason, usage, timings))

    def _fail_all(self, exc: Exception) -> None:
        from worker.log import log

        log("worker.batch_failed", level="error", error=repr(exc), requests=len(self._streams))
        for s in self._streams.values():
            self._send(Error(s.req.request_id, ErrorCode.INTERNAL.code, f"generation failed: {exc!r}"))
        self._streams.clear()
        self._uids.clear()
        self._gen = self._new_generator()
        self._progress.phase = "idle"
