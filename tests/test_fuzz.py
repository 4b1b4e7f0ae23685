"""Fuzzing both boundaries of a running supervisor with hypothesis: random bytes, random msgpack,
mutated valid messages of every type, wrong tags, wrong field types, wrong frame counts. Frames are
sent without waiting for replies (replies are drained as they come), at least 10,000 per run, on the
client control socket and on the worker socket (strangers with random and token-like identities).
Afterwards the supervisor must answer a normal request with every model as it was.
`LMX_FUZZ_EXAMPLES=N` runs N batches (default 400, of 30 frames each) for a longer run."""

from __future__ import annotations

import collections
import math
import os
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol import errors as E
from protocol.messages import TO_CLIENT, TO_SUPERVISOR_FROM_CLIENT, TO_SUPERVISOR_FROM_WORKER
from tests.harness import RunningSupervisor

EXAMPLES = int(os.environ.get("LMX_FUZZ_EXAMPLES", "400"))
FRAMES_PER_EXAMPLE = 30
PROTO = codec.PROTOCOL
REAL_MODEL = "m"

# --- strategies -----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.binary(max_size=12)
           | st.sampled_from(["", "m", "generate", "\x00", "../../etc/passwd", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

_rid = st.text(max_size=8)
_fz_model = st.text(max_size=6).map(lambda s: f"fz-{s}")
CLIENT_TEMPLATES = {
    "status": st.fixed_dictionaries({"request_id": _rid}),
    # Valid as drawn (mutations make them invalid): some reach the real model and generate.
    "generate": st.fixed_dictionaries({
        "request_id": _rid, "model": st.sampled_from([REAL_MODEL, "nope"]),
        "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "seed": st.none() | st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=4), max_size=3),
        "timeout_s": st.none() | st.floats(0.5, 30)}).flatmap(lambda d: st.one_of(
            st.fixed_dictionaries({**{k: st.just(v) for k, v in d.items()}, "prompt": st.text(max_size=20)}),
            st.fixed_dictionaries({**{k: st.just(v) for k, v in d.items()}, "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                       "content": st.text(max_size=10)}), min_size=1, max_size=2)}))),
    "cancel": st.fixed_dictionaries({"request_id": _rid}),
    "load": st.fixed_dictionaries({"request_id": _rid, "model": _fz_model, "force": st.booleans()}),
    "unload": st.fixed_dictionaries({"request_id": _rid, "model": _fz_model}),
    "admin": st.fixed_dictionaries({
        "request_id": _rid, "op": st.sampled_from(["reload", "metrics", "compat", "probe", "repair", "verify",
                                                   "release", "rollback", "swap", ""]) | st.text(max_size=6),
        "model": st.none() | _fz_model, "revision": st.none() | st.text(max_size=6),
        "path": st.none() | st.sampled_from(["/", "/etc", "..", "/dev/zero", "/tmp/x\x00y", ""]) | st.text(max_size=8)}),
    "history": st.fixed_dictionaries({"request_id": _rid, "model": _fz_model, "limit": st.integers(-2**63, 2**63)}),
}
WORKER_TEMPLATES = {
    "hello": st.fixed_dictionaries({"token": st.text(max_size=40), "pid": st.integers(-5, 2**31),
                                    "model_id": st.sampled_from([REAL_MODEL, "x"]), "adopt": st.booleans(),
                                    "revision": st.none() | st.text(max_size=12),
                                    "start_time": st.none() | st.floats(allow_nan=True)}),
    "ready": st.fixed_dictionaries({"revision": st.text(max_size=12), "load_s": st.floats(allow_nan=True),
                                    "memory": st.dictionaries(st.text(max_size=8), values, max_size=3)}),
    "heartbeat": st.fixed_dictionaries({"progress": st.integers(-5, 2**63), "phase": st.text(max_size=8),
                                        "memory": st.dictionaries(st.text(max_size=8), values, max_size=3)}),
    "chunk": st.fixed_dictionaries({"request_id": _rid, "text": st.text(max_size=8), "tokens": st.integers(-3, 9)}),
    "final": st.fixed_dictionaries({"request_id": _rid, "text": st.text(max_size=8), "finish_reason": st.text(max_size=6),
                                    "usage": st.dictionaries(st.text(max_size=8), values, max_size=3)}),
    "error": st.fixed_dictionaries({"request_id": st.none() | _rid, "code": st.text(max_size=12),
                                    "message": st.text(max_size=12)}),
}
ALL_TAGS = sorted(set(CLIENT_TEMPLATES) | set(WORKER_TEMPLATES) | set(TO_CLIENT) | {"init", "adopt", "shutdown"})


@st.composite
def mutated(draw, templates: dict) -> tuple[str, object]:
    """A valid message of some type, then zero or more mutations of its tag, fields and types."""
    tag = draw(st.sampled_from(sorted(templates)))
    fields = dict(draw(templates[tag]))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["drop", "add", "retype", "tag", "none"]))
        if how == "drop" and fields:
            fields.pop(draw(st.sampled_from(sorted(fields))))
        elif how == "add":
            fields[draw(st.text(max_size=8))] = draw(values)
        elif how == "retype" and fields:
            fields[draw(st.sampled_from(sorted(fields)))] = draw(values)
        elif how == "tag":
            tag = draw(st.sampled_from(ALL_TAGS) | st.text(max_size=10))
    return tag, fields


def _pack(obj: object) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return None


@st.composite
def frames_of(draw, templates: dict) -> list[bytes]:
    kind = draw(st.sampled_from(["bytes", "msgpack", "mutated", "mutated", "mutated", "frames"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
    elif kind == "msgpack":
        body = _pack(draw(values)) or b"\xc1"
    else:
        tag, fields = draw(mutated(templates))
        body = _pack([tag, fields]) if draw(st.integers(0, 9)) else _pack([tag, fields, 1])
        body = body or b"\xc1"
    if kind != "frames":
        return [PROTO, body]
    return draw(st.sampled_from([[body], [PROTO, body, body], [b"LMX/2", body], [b"", body], [body, PROTO]])
                | st.lists(st.binary(max_size=8), min_size=0, max_size=4).filter(bool))


def _safe_for_the_real_model(frames: list[bytes]) -> list[bytes]:
    """The fuzz must not change a real model's state on purpose (an unload of "m" is legitimate on
    the owner's socket), nor queue long generations: such frames are pointed elsewhere."""
    try:
        decoded = msgpack.unpackb(frames[1], raw=False, strict_map_key=False) if len(frames) == 2 else None
    except Exception:
        return frames
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[1], dict)):
        return frames
    tag, fields = decoded
    if fields.get("model") == REAL_MODEL:
        n = fields.get("max_tokens", 256)
        if tag != "generate" or not (isinstance(n, int) and 1 <= n <= 4):
            fields["model"] = "fz-" + REAL_MODEL
    return [frames[0], _pack([tag, fields]) or b"\xc1"]


# --- the running target ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("fuzz"), [{"id": REAL_MODEL, "path": str(tiny_model)}],
                          supervisor={"model_roots": [str(tiny_model.parent)]}).start()
    yield s
    s.cleanup()


class Fuzzer:
    """DEALERs on both sockets; sends never wait for replies (a wedged supervisor fails the send
    deadline instead of hanging the test); replies are drained and checked as they come."""

    def __init__(self, sup: RunningSupervisor) -> None:
        self.ctx = zmq.Context()
        self.control = [self._dealer(f"ipc://{sup.state_dir / 'control.sock'}") for _ in range(4)]
        # Strangers on the worker socket: random identities, and ones shaped like a worker's token.
        self.workers = [self._dealer(f"ipc://{sup.state_dir / 'workers.sock'}", ident)
                        for ident in [os.urandom(n) for n in (1, 5, 17, 255)]
                        + [os.urandom(16).hex().encode() for _ in range(4)]]
        self.sent = {"control": 0, "worker": 0}
        self.replies: collections.Counter[str] = collections.Counter()  # by tag, errors by code
        self._turn = 0

    def _dealer(self, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 15_000)
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        s.connect(endpoint)
        return s

    def send(self, boundary: str, frames: list[bytes]) -> None:
        self._turn += 1
        socks = self.control if boundary == "control" else self.workers
        socks[self._turn % len(socks)].send_multipart(frames)
        self.sent[boundary] += 1

    def drain(self, timeout_s: float = 0.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            got = False
            for s in self.control + self.workers:
                while s.poll(0):
                    reply = s.recv_multipart()
                    assert s in self.control, "a stranger on the worker socket got an answer"
                    msg = codec.decode(reply, TO_CLIENT)  # every reply is a well-formed message
                    self.replies[getattr(msg, "code", None) or msg.TAG] += 1
                    got = True
            if not got and time.monotonic() >= deadline:
                return
            if not got:
                time.sleep(0.02)

    def close(self) -> None:
        for s in self.control + self.workers:
            s.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def fuzzer(sup: RunningSupervisor):
    f = Fuzzer(sup)
    yield f
    f.close()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))


def test_fuzz_both_boundaries_then_serve_normally(sup: RunningSupervisor, fuzzer: Fuzzer) -> None:
    before = sup.model(REAL_MODEL)
    start = time.monotonic()

    @FUZZ
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        for _ in range(FRAMES_PER_EXAMPLE):
            if data.draw(st.integers(0, 2)):  # two thirds to the client socket, a third to the worker one
                fuzzer.send("control", _safe_for_the_real_model(data.draw(frames_of(CLIENT_TEMPLATES))))
            else:
                fuzzer.send("worker", data.draw(frames_of(WORKER_TEMPLATES)))
        fuzzer.drain()
        assert sup.proc.poll() is None, "the supervisor died"

    batch()
    fuzzer.drain(timeout_s=1.0)
    elapsed = time.monotonic() - start
    total = sum(fuzzer.sent.values())
    print(f"\nfuzz: {total} frames ({fuzzer.sent['control']} control, {fuzzer.sent['worker']} worker) "
          f"in {elapsed:.1f}s; replies: {dict(fuzzer.replies.most_common())}")
    assert total >= min(10_000, EXAMPLES * FRAMES_PER_EXAMPLE)
    assert fuzzer.sent["control"] > total / 2 > fuzzer.sent["worker"] > total / 5
    # Still serving everyone, every model as it was.
    assert sup.proc.poll() is None
    result = sup.client.complete(REAL_MODEL, "Hello", max_tokens=3)
    assert result.usage["completion_tokens"] >= 1
    after = sup.model(REAL_MODEL)
    assert after["state"] == "READY"
    assert (after["worker_pid"], after["restarts"]) == (before["worker_pid"], before["restarts"])
    assert not sup.events("internal.control_failed") and not sup.events("supervisor.fatal")


@FUZZ
@given(frames_of(CLIENT_TEMPLATES) | frames_of(WORKER_TEMPLATES))
def test_the_decoders_raise_only_typed_errors(frames: list[bytes]) -> None:
    """In-process, both tables: anything a peer sends decodes or is a BAD_REQUEST, never another
    exception (the control loop would die on one: the supervisor exits 70)."""
    for table in (TO_SUPERVISOR_FROM_CLIENT, TO_SUPERVISOR_FROM_WORKER):
        try:
            codec.decode(frames, table)
        except E.LmxError as exc:
            assert exc.code is E.ErrorCode.BAD_REQUEST


_C, _W = TO_SUPERVISOR_FROM_CLIENT, TO_SUPERVISOR_FROM_WORKER


@pytest.mark.parametrize("table,frames", [
    # Regressions: values that reached the supervisor's timers, a worker, the watchdog's arithmetic
    # or the request queue unchecked before decoded messages had bounds.
    (_C, [PROTO, msgpack.packb(["generate", {"request_id": "r", "model": "m", "prompt": "p", "timeout_s": math.nan}])]),
    (_C, [PROTO, msgpack.packb(["generate", {"request_id": "r", "model": "m", "prompt": "p",
                                             "max_tokens": 2**64 - 1}])]),
    (_C, [PROTO, msgpack.packb(["generate", {"request_id": "r", "model": "m", "prompt": "p", "seed": -1}])]),
    (_C, [PROTO, b"\x92\xa8generate" + b"\x91" * 40 + b"\xc0"]),
    (_C, [PROTO, msgpack.packb(["admin", {"request_id": "r", "op": "probe", "path": "a\x00b"}])]),
    (_W, [PROTO, msgpack.packb(["heartbeat", {"progress": 1, "phase": "x", "memory": {"rss_bytes": "1"}}])]),
    (_W, [PROTO, msgpack.packb(["final", {"request_id": "r", "text": "", "finish_reason": "s",
                                          "usage": {"completion_tokens": -1}}])]),
])
def test_regressions_are_bad_requests(table: dict, frames: list[bytes]) -> None:
    with pytest.raises(E.BadRequest):
        codec.decode(frames, table)
