"""The worker's one serving path, with mlx-lm's own BatchGenerator: requests join the running batch
between decode steps, each streams its own tokens and ends on its own stop condition (EOS,
max_tokens, a stop string), with its own sampler. A cancel removes its sequence before the next
step. Prompt work is one chunk per step (worker.prefill), so a long prompt cannot starve running
streams, a cancel stops it within a chunk, and progress moves per chunk. With max_batch_size = 1
requests run one at a time, in arrival order.

A request that arrives to an idle worker runs alone: its prompt in chunks, one per step, then on
mlx-lm's generate_step (the path of stream_generate, whose pipelining a batch of one cannot match; a seed gives its exact sequence);
when a second request arrives, the solo sequence moves into the batch with its KV cache as it is and
the token generate_step had sampled ahead (worker.solo): nothing is recomputed or fed twice.

Every request starts from the longest prefix of its prompt the prefix cache holds
(worker.prefixcache) and, once finished, leaves its KV there for the next turn. Every step, prefill
included, moves the progress counter and sets the phase the supervisor's stall verdicts read."""

from __future__ import annotations

import collections
import time
from typing import Any, Callable

from protocol.errors import ErrorCode
from protocol.messages import Chunk, Chunks, CountTokens, Error, Final, GenerateRequest, Message, TokenCount
from protocol.phase import Phase
from worker import checkpoint, prefill, sampling, shaping, thinkbudget
from worker.channel import Progress
from worker.engine import Engine
from worker.logprobs import token_logprobs  # noqa: F401  (its import path of old: bench/constrain_cost.py)
from worker.pacing import Pacer
from worker.prefixcache import PrefixCache
from worker.solo import Solo, lookahead, rebase_processors
from worker.streams import Stream


class ContextExceeded(ValueError):
    """A prompt past the model's context_tokens: BAD_REQUEST with the figures in its details."""

    def __init__(self, prompt_tokens: int, context_tokens: int) -> None:
        super().__init__(f"the prompt has {prompt_tokens} tokens; the model's context_tokens is {context_tokens}")
        self.details = {"reason": "context_length_exceeded", "prompt_tokens": prompt_tokens,
                        "context_tokens": context_tokens}


class Batcher:
    _SOLO = -1  # the solo stream's key in _streams

    def __init__(self, engine: Engine, progress: Progress, send: Callable[[Message], None],
                 max_batch_size: int, prefill_step_size: int, stream_interval_s: float,
                 prefix: PrefixCache, context_tokens: int = 0) -> None:
        self._engine = engine
        self._progress = progress
        self._send = send
        self._max = max_batch_size
        self._chunks = prefill.ChunkSize(prefill_step_size)  # the next prefill chunk's size, solo and batch
        self.prefix = prefix
        self._ckpt = checkpoint.Checkpoints(engine.model, prefix)  # prompt-end entries (worker.checkpoint)
        self.context_tokens = context_tokens  # 0: no limit (Init.context_tokens)
        self._streams: dict[int, Stream] = {}
        self._waiting: collections.deque[GenerateRequest] = collections.deque()  # one at a time: next
        # Chunks not sent yet: request id -> [request_id, text, tokens], merged per stream.
        self._out: dict[str, list] = {}
        self._first: set[str] = set()  # streams whose first chunk is waiting: never held back
        self._pacer = Pacer(stream_interval_s)
        self._step_s = 0.0  # how long the last step took: what the next is expected to take
        self._uids: dict[str, int] = {}  # request id -> BatchGenerator uid (or the solo's -1)
        self._gen = self._new_generator()
        self._solo: Solo | None = None
        self._machines: dict[bool, Any] = {}  # mlx-lm TextStateMachine, without and with tool calls
        self._eos = set(engine.tokenizer.eos_token_ids)
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        # Attention caches only (KVCache, RotatingKVCache: trimmable while fresh); a recurrent state
        # runs in the batch from the start. The move trims nothing, whatever the cache holds by then.
        self._solo_ok = can_trim_prompt_cache(make_prompt_cache(engine.model))

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        tok = self._engine.tokenizer
        return BatchGenerator(self._engine.model, stop_tokens=[[t] for t in tok.eos_token_ids],
                              completion_batch_size=self._max, prefill_batch_size=min(self._max, 8),
                              prefill_step_size=self._chunks.n)

    def __len__(self) -> int:
        return len(self._streams) + len(self._waiting)

    def add(self, req: GenerateRequest) -> None:
        if self._max == 1 and self._streams:
            self._waiting.append(req)
            return
        try:
            prompt = self._prompt(req)
            if not prompt:
                raise ValueError("the prompt is empty")
            if self.context_tokens and len(prompt) >= self.context_tokens:
                # Refused before prefill: KV past the admitted context could take the worker down.
                raise ContextExceeded(len(prompt), self.context_tokens)
            sampler = self._sampler(req)
            stream = self._stream(req, prompt)
            processors = self._processors(req)
            processors += self._controls(req, stream)
        except Exception as exc:  # this request's input is unusable; the batch goes on
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot start generation: {exc}",
                             dict(getattr(exc, "details", {}))))
            return
        cache, rest = self.prefix.fetch(prompt)
        stream.cached_tokens = len(prompt) - len(rest)
        stream.prefix_clears = self.prefix.clears
        try:
            # With logits processors never alone: a move into the batch would feed a processor twice.
            if self._runs_alone(req, processors):
                uid = self._start_solo(req, rest, cache, sampler, processors)
            else:
                if self._solo is not None:
                    self._solo_to_batch()
                (uid,) = self._gen.insert([rest], [req.max_tokens], caches=[cache],
                                          all_tokens=[prompt[:len(prompt) - len(rest)]], samplers=[sampler],
                                          logits_processors=[processors])
        except Exception as exc:
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot start generation: {exc}"))
            return
        self._streams[uid] = stream
        self._uids[req.request_id] = uid
        self._first.add(req.request_id)

    def _prompt(self, req: GenerateRequest) -> list[int]:  # a group's follower: rank 0's (worker.group)
        return self._engine.prompt_tokens(req)

    def _runs_alone(self, req: GenerateRequest, processors: list) -> bool:
        solo_safe = all(getattr(p, "solo_safe", False) for p in processors)
        return self._solo_ok and not self._streams and req.max_tokens > 1 and solo_safe

    def count(self, req: CountTokens) -> None:
        """A prompt's token count, from the rendering a generation of it would get; between steps,
        never touching the batch or the prefix cache."""
        try:
            self._engine.uses_tools(req)  # type: ignore[arg-type]  (refused as its generation would be)
            n = len(self._engine.prompt_tokens(req))  # type: ignore[arg-type]
        except Exception as exc:  # this request's input is unusable; the batch goes on
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot count tokens: {exc}"))
            return
        self._send(TokenCount(req.request_id, n))

    def _sampler(self, req: GenerateRequest) -> Any:
        return sampling.make(req.temperature, req.top_p, req.top_k)

    def _stream(self, req: GenerateRequest, prompt: list[int]) -> Stream:
        tok = self._engine.tokenizer
        stream = Stream(req, tok.detokenizer, prompt)
        tools = self._engine.uses_tools(req)
        edges = shaping.transitions(tok, tools)
        if edges is not None:
            machine = self._machines.get(tools)
            if machine is None:
                from mlx_lm.generate import TextStateMachine

                machine = self._machines[tools] = TextStateMachine(edges)
            # A response_format's grammar holds from the first token: there is no thinking to split off.
            json_out = bool(req.response_format) and req.response_format.get("type") != "text"
            initial = "normal" if json_out else shaping.initial_state(tok, prompt)
            stream.shaper = shaping.Shaper(machine, initial, tok.tool_parser, req.tools, tok.tool_call_end)
        if req.logprobs:
            stream.logprobs = []
        return stream

    def _processors(self, req: GenerateRequest) -> list:
        """mlx-lm logits processors for this request: constrained decoding (worker.constrain) for a
        response_format or a required / named tool call. Raises for what cannot be enforced (a
        ValueError: the request's 400)."""
        rf = req.response_format if req.response_format and req.response_format.get("type") != "text" else None
        forced = req.tool_choice in ("required", "function")
        if rf is None and not forced:
            return []
        from worker import constrain

        tok = self._engine.tokenizer
        if rf is not None and forced:
            raise ValueError("response_format and a forced tool call cannot both shape one answer")
        if forced:
            parser = tok.tool_parser
            rf = {"type": "tool_call", "tools": req.tools, "name": req.tool_name if req.tool_choice == "function" else None,
                  "parser": parser.__module__.rsplit(".", 1)[-1] if parser is not None else None}
        return [constrain.make_processor(tok, rf)]

    def _controls(self, req: GenerateRequest, stream: Stream) -> list:
        """Processors that hold whatever writes the text (the model, or a test's script standing in
        for _processors): a thinking budget. None under a grammar, which leaves no thinking."""
        json_out = bool(req.response_format) and req.response_format.get("type") != "text"
        if req.thinking_budget is None or json_out or req.tool_choice in ("required", "function"):
            return []
        tok = self._engine.tokenizer
        budget = thinkbudget.make(tok, req.thinking_budget, shaping.initial_state(tok, stream.prompt) == "reasoning",
                                  self._engine.uses_tools(req))
        return [budget] if budget is not None else []

    # --- a request alone: generate_step, then into the batch when company comes --------------

    def _start_solo(self, req: GenerateRequest, rest: list[int], cache: list | None, sampler: Any,
                    processors: list | None = None) -> int:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        if req.seed is not None:
            mx.random.seed(req.seed)  # alone, a seed gives the exact sequence
        if cache is None:
            cache = make_prompt_cache(self._engine.model)
        self._solo = Solo(None, cache, rest, sampler, req.max_tokens, processors=list(processors or []))
        return self._SOLO

    def _solo_step(self) -> None:
        """One prefill chunk, or (once at most one chunk is left) one token from generate_step."""
        solo = self._solo
        assert solo is not None
        stream = self._streams[self._SOLO]
        if self._ckpt.solo(self._chunks, solo, stream) or prefill.solo_chunk(self._engine.model, self._chunks, solo):
            return
        token, logprobs = next(solo.tokens_gen)
        solo.yielded += 1
        self._solo_token(solo, token, logprobs)

    def _solo_token(self, solo: Solo, token: int, logprobs: Any) -> None:
        stream = self._streams[self._SOLO]
        reason = "stop" if token in self._eos else ("length" if solo.yielded >= stream.req.max_tokens else None)
        self._on_token(self._SOLO, stream, token, reason, time.monotonic(), logprobs=logprobs)

    def _drop_solo(self) -> None:
        if self._solo is not None and self._solo.tokens_gen is not None:
            self._solo.tokens_gen.close()
        self._solo = None

    def _solo_to_batch(self) -> None:
        """The solo sequence joins the batch: its cache as it is, and generate_step's sampled-ahead
        token (worker.solo), the solo's own last one, for the batch to feed next. Nothing is
        trimmed, recomputed or fed twice; a lookahead that ends the request ends it here."""
        solo, stream = self._solo, self._streams[self._SOLO]
        assert solo is not None
        if solo.yielded == 0:  # generate_step never ran: its cache holds the prompt but `rest`
            prompt, known = solo.rest, stream.prompt[:len(stream.prompt) - len(solo.rest)]
        else:
            self._solo_token(solo, *lookahead(solo))
            if self._SOLO not in self._streams:  # that token ended it: finished as alone
                return
            prompt, known = stream.generated[-1:], stream.prompt + stream.generated[:-1]
            rebase_processors(solo.processors, known)
        del self._streams[self._SOLO]
        self._drop_solo()
        (uid,) = self._gen.insert([prompt], [stream.req.max_tokens - solo.yielded], caches=[solo.cache],
                                  all_tokens=[known], samplers=[solo.sampler],
                                  logits_processors=[solo.processors])
        self._streams[uid] = stream
        self._uids[stream.req.request_id] = uid

    def cancel(self, request_id: str) -> None:
        waiting = [r for r in self._waiting if r.request_id == request_id]
        for r in waiting:
            self._waiting.remove(r)
        uid = self._uids.pop(request_id, None)
        if uid is None and not waiting:
            return  # finished already: its Final is on the wire
        if uid is not None:
            self._end(uid)
            del self._streams[uid]
        self._out.pop(request_id, None)  # its client is gone: what it had not been sent stays here
        self._first.discard(request_id)
        self._send(Error(request_id, ErrorCode.CANCELLED.code, "cancelled by client"))
        if not len(self):  # no step runs until work comes: idle now, not later
            self._progress.phase = Phase.IDLE

    def cancel_all(self) -> None:
        for req in list(self._waiting):
            self.cancel(req.request_id)
        for rid in list(self._uids):
            self.cancel(rid)

    def _end(self, uid: int, keep_cache: bool = False) -> tuple[list, list[int]] | None:
        """Take a sequence out of generation; with keep_cache, (its KV cache, the tokens in it)."""
        if uid == self._SOLO:
            solo = self._solo
            self._drop_solo()
            if keep_cache and solo is not None:
                s = self._streams[uid]
                tokens = s.prompt + s.generated
                return solo.cache, tokens[:len(tokens) - solo.behind]  # what the cache holds
            return None
        caches = self._gen.remove([uid], return_prompt_caches=keep_cache)
        return caches.get(uid) if keep_cache else None

    def step(self) -> None:
        """One step: a decode step for running streams and a bounded slice of prompt work for new
        ones. Fails the whole batch (not the worker) if mlx raises."""
        progress = self._progress
        if not self._streams and self._waiting:
            self.add(self._waiting.popleft())
            return
        start = time.monotonic()
        # Set before the step: a step that never returns must be judged by the phase it hangs in.
        decoding = any(s.first_token_s is not None for s in self._streams.values())
        progress.phase = Phase.DECODE if decoding else Phase.PREFILL
        try:
            if self._solo is not None:
                self._solo_step()
                prompts: list = []
                responses: list = []
            else:
                self._gen.prefill_step_size = n = self._chunks.n
                prompts, responses = self._gen.next()
                self._ckpt.batch(self._gen, prompts, self._streams)
        except Exception as exc:
            self._fail_all(exc)
            return
        progress.count += 1
        now = time.monotonic()
        self._step_s = now - start
        if any(not p.end_of_prompt for p in prompts):  # a step with prompt work: chunk size follows it
            self._chunks.took(n, self._step_s)
        for r in responses:
            s = self._streams.get(r.uid)
            if s is not None:
                self._on_token(r.uid, s, r.token, r.finish_reason, now, (r.prompt_cache, r.all_tokens), r.logprobs)
        self._flush(step_end=True)
        if not self._streams and not self._waiting:
            progress.phase = Phase.IDLE

    def _on_token(self, uid: int, s: Stream, token: int, finish_reason: str | None, now: float,
                  finished_cache: tuple | None = None, logprobs: Any = None) -> None:
        if s.logprobs is not None and finish_reason != "stop":  # EOS is no token of the answer
            s.logprobs.append(token_logprobs(self._engine.tokenizer, token, logprobs, s.req.top_logprobs))
        text, tokens, stopped = s.on_token(token, finish_reason, now)
        extras = s.extras()
        if text or tokens or extras:
            self._chunk(s.req.request_id, text, tokens, extras)
        if stopped:
            kept = self._end(uid, keep_cache=True)
            self._finish(uid, s, "stop", now, kept)
        elif finish_reason is not None:
            if uid == self._SOLO:
                kept = self._end(uid, keep_cache=True)
            else:
                kept = finished_cache  # the batch has let it go already
            self._finish(uid, s, finish_reason, now, kept)

    def _chunk(self, rid: str, text: str, tokens: int, extras: dict) -> None:
        held = self._out.get(rid)
        if held is None:
            self._out[rid] = [rid, text, tokens, extras] if extras else [rid, text, tokens]
            return
        held[1] += text
        held[2] += tokens
        if extras:
            if len(held) == 3:
                held.append({})
            for k, v in extras.items():  # every extra is a str or a list: both add up
                held[3][k] = held[3].get(k, type(v)()) + v

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
        if len(out) == 1:
            rid, text, tokens, *extras = out[0]
            self._send(Chunk(rid, text, tokens, **(extras[0] if extras else {})))
        else:
            self._send(Chunks(out))

    def _finish(self, uid: int, s: Stream, reason: str, now: float, kept: tuple | None) -> None:
        del self._streams[uid]
        self._uids.pop(s.req.request_id, None)
        self._flush()
        reason, fields = s.final_fields(reason)
        self._send(Final(s.req.request_id, s.text, reason, s.usage(), s.timings(now), **fields))
        self._ckpt.commit(s)  # its prompt-end entry too: only a finished request stores anything
        if kept is not None and kept[0] is not None and s.prefix_clears == self.prefix.clears:  # no clear since
            # After the final is on the wire: the client never waits for the cache's bookkeeping.
            self.prefix.store(list(kept[1]), kept[0], shared=uid != self._SOLO)

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
        self._progress.phase = Phase.IDLE

