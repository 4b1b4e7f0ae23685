"""A rank of a group: one model served by several worker processes on mx.distributed, in lockstep.

Every rank gets every request (the supervisor sends it to all of them, in the same order, one at a
time) and runs the same generation: same prompt, same prefill chunks, same steps, so the model's own
collectives (tensor parallel: mlx-lm's `model.shard`; pipeline: `model.model.pipeline`) meet. What
could differ between ranks is decided by rank 0 alone and learnt by the others in one all_sum of a
few integers (to which they add zeros), before the work it decides:
- at a request's start: whether it runs (rank 0 renders and admits it as one host would; a refusal
  or a cancel while it waited is a length of 0) and its prompt tokens. A follower never renders, so
  a render's time bound (worker.render) cannot refuse a request on one rank and not another;
- before each prompt chunk: its size (timed on rank 0 toward worker.prefill's target, as one host
  does), or stop. So a cancel, a deadline or a cancel-all ends a long prompt on every rank at the
  same chunk boundary, within a chunk, and progress moves per chunk on every rank;
- with each decode step's token: the token rank 0 sampled (so sampling, seeds and logits processors
  are rank 0's, and every rank feeds the same token back), and a stop flag. Rank 0 ends a request
  for any reason (EOS, a stop string, a cancel, a deadline) by raising the flag; since
  generate_step has already scheduled the next step when a token is seen, the flag comes back two
  steps later, and every rank closes its generator at that same step. Only max_tokens ends a
  generation without the flag: it is the same number on every rank.

A follower sends nothing but heartbeats: its chunks and finals would repeat rank 0's. Between
requests every rank waits on its ZeroMQ inbox, not in a collective (a collective whose peer is idle
spins at 100 % CPU). Any exception in a step ends the process: a group whose collectives broke
cannot go on, and the supervisor ends and restarts the whole group."""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Callable

from protocol.errors import ErrorCode
from protocol.messages import Error, GenerateRequest, Heartbeat, Init, Message
from protocol.phase import Phase
from worker import prefill
from worker.batch import Batcher
from worker.channel import Progress
from worker.engine import Engine
from worker.log import log
from worker.prefixcache import PrefixCache


def guard(death_fd: int | None) -> None:
    """A rank can sit in a collective (or in init) with the GIL held for as long as a peer is away,
    so the IO thread's orphan watch cannot run. A shell in this process group holds a copy of the
    death pipe instead: when the supervisor is gone it SIGKILLs this rank at once (its group is
    over). The supervisor's SIGKILL of the process group takes the shell with it."""
    if death_fd is None:
        return
    import subprocess

    watch = os.dup(death_fd)
    try:
        subprocess.Popen(["/bin/sh", "-c", f"cat >/dev/null; kill -KILL {os.getpid()} 2>/dev/null"],
                         stdin=watch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    finally:
        os.close(watch)


def _init(spec: dict) -> Any:
    """This process's place in the group, from MLX's own environment (MLX_RANK with MLX_HOSTFILE
    for ring; MLX_IBV_DEVICES and MLX_JACCL_COORDINATOR for jaccl), set by the supervisor."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend=spec["backend"])
    if group.size() != spec["size"] or group.rank() != spec["rank"]:
        raise RuntimeError(f"mx.distributed says rank {group.rank()} of {group.size()}; "
                           f"the supervisor placed this process as rank {spec['rank']} of {spec['size']}")
    return group


def load(engine: Engine, path: str, group: Any, parallel: str) -> None:
    """This rank's share of the weights, through mlx-lm's own sharding."""
    from mlx_lm.utils import sharded_load

    if not parallel:  # what the model supports, tensor parallel first
        try:
            engine.model, engine.tokenizer = sharded_load(path, tensor_group=group)
            return
        except ValueError as exc:
            if "tensor parallelism" not in str(exc):
                raise
        parallel = "pipeline"
    kind = {"tensor": "tensor_group", "pipeline": "pipeline_group"}[parallel]
    engine.model, engine.tokenizer = sharded_load(path, **{kind: group})


def join_and_load(engine: Engine, init: Init, channel: Any, progress: Progress, death_fd: int | None) -> tuple[Any, float]:
    """(the group, seconds to join and load): this rank's place in the group, then its share."""
    log("worker.group_joining", **describe(init.group))
    start = time.monotonic()
    guard(death_fd)
    # Said before init, which holds the GIL (no heartbeat) until every rank has joined.
    progress.phase = Phase.JOINING
    channel.send(Heartbeat(progress.count, Phase.JOINING.value, progress.memory(), {}))
    group = _init(init.group)
    progress.phase = Phase.LOADING
    load(engine, init.path, group, init.group["parallel"])
    return group, time.monotonic() - start


def describe(spec: dict) -> dict:
    """For the load log line: where this rank's ring listens (MLX's hostfile)."""
    out = {"rank": spec["rank"], "size": spec["size"], "backend": spec["backend"], "parallel": spec["parallel"]}
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        try:
            with open(hostfile) as f:
                out["hosts"] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


def _drop(_: Message) -> None:
    pass


class GroupBatcher(Batcher):
    """The worker's serving path, one request at a time, in lockstep with the other ranks."""

    def __init__(self, engine: Engine, progress: Progress, send: Callable[[Message], None], group: Any,
                 prefill_step_size: int, stream_interval_s: float, context_tokens: int) -> None:
        self._rank = group.rank()
        self._group = group
        super().__init__(engine, progress, send if self._rank == 0 else _drop, 1, prefill_step_size,
                         stream_interval_s, PrefixCache("group", 0), context_tokens)
        self._flags: collections.deque = collections.deque()  # each scheduled step's stop flag, in order
        self._stop = False  # rank 0: the flag the next scheduled step (or prompt chunk) carries
        self._draining = None  # rank 0: a finished request's generation, run until every rank ends it
        self._doomed: set[str] = set()  # rank 0: cancelled while waiting; refused to all when its turn comes
        self._told: list[int] | None = None  # a follower: the prompt rank 0 rendered for the request it adds

    def __len__(self) -> int:
        return super().__len__() + (self._draining is not None)

    def _runs_alone(self, req: GenerateRequest, processors: list) -> bool:
        return True  # generate_step, always: one request at a time, logits processors included

    def _prompt(self, req: GenerateRequest) -> list[int]:
        return super()._prompt(req) if self._told is None else self._told

    def _agreed(self, mine: list[int], size: int) -> list[int]:
        """Rank 0's `mine` (`size` integers), on every rank: one all_sum to which the others add
        zeros. On generate_step's stream, as the sampler's is: a collective on another stream
        meeting one of it crashes mlx."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            values = mx.array(mine if self._rank == 0 else [0] * size, dtype=mx.int32)
            return mx.distributed.all_sum(values, group=self._group).tolist()

    def _sampler(self, req: GenerateRequest) -> Any:
        import mlx.core as mx

        base = super()._sampler(req)
        leader = self._rank == 0

        def sample(logprobs: Any) -> Any:
            token = base(logprobs).astype(mx.int32)
            flag = mx.array([1 if leader and self._stop else 0], dtype=mx.int32)
            mine = mx.concatenate([token if leader else mx.zeros_like(token), flag])
            both = mx.distributed.all_sum(mine, group=self._group)
            self._flags.append(both[1])
            return both[:1]

        return sample

    def add(self, req: GenerateRequest) -> None:
        self._waiting.append(req)  # begun by step, on every rank at the same point of the collectives

    def _begin(self, req: GenerateRequest) -> None:
        """The next request, on every rank together: rank 0 renders and admits it as one host would
        (a refusal goes to its client), then tells the others in one collective the length of the
        prompt it runs (0: refused, or cancelled while waiting: nothing runs anywhere) and in a
        second its tokens. A follower never renders: its own render could stop at the time bound
        (worker.render) where rank 0's did not, or the other way round, and the ranks would part."""
        prompt: list[int] = []
        self._progress.phase = Phase.PREFILL
        if self._rank == 0 and req.request_id in self._doomed:
            self._doomed.discard(req.request_id)
        elif self._rank == 0:
            super().add(req)
            if self._solo is not None:
                prompt = self._streams[self._SOLO].prompt
        (n,) = self._agreed([len(prompt)], 1)
        if n and self._rank != 0:
            self._told = self._agreed(prompt, n)
            try:
                super().add(req)
            finally:
                self._told = None
            if self._solo is None:  # rank 0 runs it and this rank cannot: the group cannot go on
                raise RuntimeError(f"rank {self._rank} could not start {req.request_id}, which rank 0 started")
        elif n:
            self._agreed(prompt, n)
        if not n and not self._waiting:
            self._progress.phase = Phase.IDLE

    def cancel(self, request_id: str) -> None:
        """Rank 0's. A follower's requests end when rank 0 says so, never on their own; so a request
        cancelled while it waits is refused to every rank when its turn comes. Its client hears
        CANCELLED now."""
        if self._rank != 0:
            return
        if request_id in self._doomed:
            return
        if any(r.request_id == request_id for r in self._waiting):
            self._doomed.add(request_id)
            self._send(Error(request_id, ErrorCode.CANCELLED.code, "cancelled by client"))
            return
        super().cancel(request_id)

    def _drop_solo(self) -> None:
        """Rank 0 is done with a request: the next prompt chunk's decision, or the generator's
        step whose flag is raised now (its output unused), ends it on every rank; unless max_tokens
        ends it here on every rank anyway."""
        solo, self._solo = self._solo, None
        if solo is None:
            return
        if solo.tokens_gen is not None and solo.yielded >= solo.limit:
            self._close(solo)
        else:
            self._stop = True
            self._draining = solo

    def _prompt_chunk(self, solo: Any) -> bool:
        """Every rank: rank 0's decision on the next prompt chunk (its size, timed on rank 0 toward
        worker.prefill's target as on one host; or stop), learnt in one collective, then that
        chunk. True when this step is done (a chunk ran, or every rank ended the request here);
        False once generate_step has taken the rest of the prompt: its first token is this step's."""
        n, stop = self._agreed([0 if self._stop else self._chunks.n, int(self._stop)], 2)
        if stop:
            self._ended(solo)
            return True
        took = prefill.next_chunk(self._engine.model, solo, n)
        if took is None:
            return False
        if self._rank == 0:
            self._chunks.took(n, took)
        return True

    def _solo_step(self) -> None:
        solo = self._solo
        assert solo is not None
        if solo.tokens_gen is None and self._prompt_chunk(solo):
            return
        super()._solo_step()  # rank 0's own, through its stream; the step's flag is its own too
        if self._flags:
            self._flags.popleft()

    def _ended(self, solo: Any) -> None:
        """Every rank has ended `solo`'s request at this step: close it; the group is free."""
        if solo.tokens_gen is not None:
            self._close(solo)
        self._stop = False
        self._draining = None
        self._solo = None
        if self._rank != 0:
            self._streams.clear()
            self._uids.clear()
            self._first.clear()
        if not self._streams and not self._waiting:
            self._progress.phase = Phase.IDLE

    def _close(self, solo: Any) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        solo.tokens_gen.close()
        # The step generate_step scheduled ahead still runs, collectives and all: let it finish on
        # its stream before anything else (another stream's collective meeting it crashes mlx).
        mx.synchronize(generation_stream)
        self._flags.clear()
        self._stop = False

    def _lockstep_next(self, solo: Any) -> bool:
        """One step of `solo`'s generation; True when every rank ends it at this step."""
        self._progress.count += 1
        next(solo.tokens_gen)
        solo.yielded += 1
        flag = self._flags.popleft()
        return bool(flag.item()) or solo.yielded >= solo.limit

    def step(self) -> None:
        if self._draining is not None:  # rank 0
            drained = self._draining
            if drained.tokens_gen is None:
                self._progress.count += 1
                self._prompt_chunk(drained)  # carries the stop: every rank ends it here
            elif self._lockstep_next(drained):
                self._ended(drained)
            return
        if self._solo is None:
            if self._waiting:
                self._begin(self._waiting.popleft())
            return
        if self._rank == 0:
            super().step()
            return
        self._follow()

    def _follow(self) -> None:
        """A follower's step: the same prompt chunks and generation as rank 0's, ended by rank 0."""
        solo = self._solo
        assert solo is not None
        self._progress.phase = Phase.DECODE if solo.yielded else Phase.PREFILL
        if solo.tokens_gen is None and self._prompt_chunk(solo):
            self._progress.count += 1
            return
        if self._lockstep_next(solo):
            self._ended(solo)

    def _fail_all(self, exc: Exception) -> None:
        log("worker.group_step_failed", level="error", error=repr(exc), rank=self._rank)
        raise exc  # the group cannot go on without this rank's collectives: the process ends
