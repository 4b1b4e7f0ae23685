"""Hostile input on both sockets of a real supervisor: every kind is sent for real, and afterwards
the supervisor still serves a normal generation and the model is still READY (and never restarted).
A worker that breaks the protocol under its own identity is killed, classified and counted."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from protocol import codec
from protocol import errors as E
from protocol.messages import TO_CLIENT, TO_SUPERVISOR_FROM_CLIENT, TO_SUPERVISOR_FROM_WORKER, Error
from tests.harness import RunningSupervisor, process_gone, wait_until

PROTO = codec.PROTOCOL


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("hostile")
    trigger = root / "garbage.trigger"
    s = RunningSupervisor(root, [
        {"id": "m", "path": str(tiny_model)},
        {"id": "g", "path": str(tiny_model), "canary": {"prompt": "Hello", "max_tokens": 2},
         "worker_command": [sys.executable, "-m", "tests.hostile_worker", "--trigger", str(trigger)]},
    ], restart={"quarantine_after": 10}).start()
    s.trigger = trigger
    yield s
    s.cleanup()


@pytest.fixture
def baseline(sup: RunningSupervisor) -> dict:
    """The state every hostile test must leave behind: m READY on the same worker, never restarted."""
    m = sup.model("m")
    assert m["state"] == "READY"
    yield m
    result = sup.client.complete("m", "Hello", max_tokens=3)
    assert result.usage["completion_tokens"] >= 1
    after = sup.model("m")
    assert after["state"] == "READY"
    assert (after["worker_pid"], after["restarts"]) == (m["worker_pid"], m["restarts"])
    assert sup.proc.poll() is None


class Raw:
    """A bare DEALER on a socket of the supervisor: sends anything, reads replies with a deadline."""

    def __init__(self, endpoint: str, identity: bytes | None = None, **opts: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        for k, v in opts.items():
            self.sock.setsockopt(getattr(zmq, k), v)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def reply(self, timeout_s: float = 5.0) -> list[bytes] | None:
        if self.sock.poll(timeout_s * 1000):
            return self.sock.recv_multipart()
        return None

    def error(self, frames: list[bytes], timeout_s: float = 5.0) -> Error:
        self.send(frames)
        reply = self.reply(timeout_s)
        assert reply is not None, "no reply"
        msg = codec.decode(reply, TO_CLIENT)
        assert isinstance(msg, Error), msg
        return msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(sup: RunningSupervisor):
    r = Raw(f"ipc://{sup.state_dir / 'control.sock'}")
    yield r
    r.close()


def body(tag: str, **fields) -> bytes:
    return msgpack.packb([tag, fields], use_bin_type=True)


def gen(**over) -> bytes:
    fields = {"request_id": "h1", "model": "m", "prompt": "Hello", "max_tokens": 3, **over}
    return body("generate", **fields)


def bad_request(raw: Raw, frames: list[bytes]) -> Error:
    err = raw.error(frames)
    assert err.code == "BAD_REQUEST", err
    return err


def log_count(sup: RunningSupervisor, event: str) -> int:
    return len(sup.events(event))


# --- frames and types -----------------------------------------------------------------------------


def test_malformed_msgpack(sup, baseline, raw) -> None:
    assert "malformed msgpack" in bad_request(raw, [PROTO, b"\xc1\xc1\xc1"]).message
    bad_request(raw, [PROTO, b"\x92"])  # truncated
    bad_request(raw, [PROTO, b""])


def test_wrong_protocol_version_and_frame_counts(sup, baseline, raw) -> None:
    err = bad_request(raw, [b"LMX/2", gen()])
    assert err.details["expected"] == "LMX/1" and err.details["got"] == "LMX/2"
    bad_request(raw, [gen()])
    bad_request(raw, [PROTO, gen(), b"extra"])
    bad_request(raw, [b"\xff" * 100, b"\x00"])


def test_wrong_shapes_types_and_unknown_ops(sup, baseline, raw) -> None:
    for frames in (
        [PROTO, msgpack.packb({"generate": 1})],
        [PROTO, msgpack.packb(["generate"])],
        [PROTO, msgpack.packb([7, {}])],
        [PROTO, body("no_such_op", request_id="x")],
        [PROTO, body("status_reply", request_id="x", supervisor={}, models=[])],  # misdirected
        [PROTO, gen(max_tokens="3")],
        [PROTO, gen(max_tokens=True)],
        [PROTO, gen(prompt=b"bytes, not str")],
        [PROTO, gen(stop="not a list")],
        [PROTO, gen(messages=[1, 2])],
        [PROTO, gen(unknown_field=1)],
        [PROTO, body("generate", request_id="x")],  # missing model
        [PROTO, msgpack.packb(["generate", {"request_id": "x", "model": "m", 1: 2}])],
    ):
        bad_request(raw, frames)
    err = raw.error([PROTO, body("admin", request_id="a1", op="no-such-admin-op")])
    assert err.code == "BAD_REQUEST" and err.request_id == "a1"


def test_invalid_utf8_in_the_prompt(sup, baseline, raw) -> None:
    # A msgpack str (not bin) whose bytes are not UTF-8: msgpack raw=False refuses to decode it.
    bad = b"\x92\xa8generate\x84\xaarequest_id\xa2u8\xa5model\xa1m\xa6prompt\xa4\xff\xfe\xfd\xfc\xaamax_tokens\x03"
    assert "malformed msgpack" in bad_request(raw, [PROTO, bad]).message
    # A lone surrogate cannot be encoded as UTF-8 at all; the closest a peer can send is CESU bytes.
    bad_request(raw, [PROTO, bad.replace(b"\xa4\xff\xfe\xfd\xfc", b"\xa3\xed\xa0\x80")])


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 2**40), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 2**64 - 1),
    ("timeout_s", math.nan), ("timeout_s", math.inf), ("timeout_s", -1.0), ("timeout_s", 0),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", 1e308),
    ("top_p", 2.0), ("top_p", math.nan), ("seed", -1), ("seed", -(2**63)),
])
def test_out_of_range_numbers(sup, baseline, raw, field, value) -> None:
    err = bad_request(raw, [PROTO, gen(**{field: value})])
    assert field in err.message


def test_oversized_strings_lists_and_nesting(sup, baseline, raw) -> None:
    bad_request(raw, [PROTO, gen(prompt="x" * 2_000_001)])
    bad_request(raw, [PROTO, gen(prompt=None, messages=[{"role": "user", "content": "hi"}] * 4097)])
    bad_request(raw, [PROTO, gen(stop=["s"] * 17)])
    bad_request(raw, [PROTO, gen(stop=["s" * 1025])])
    bad_request(raw, [PROTO, gen(request_id="r" * 129)])
    deep: object = "x"
    for _ in range(500):
        deep = [deep]
    assert "deeper" in bad_request(raw, [PROTO, gen(prompt=None, messages=[{"role": "u", "content": deep}])]).message
    # Deeper than msgpack's own stack: refused by the decoder itself.
    bad_request(raw, [PROTO, b"\x92\xa8generate" + b"\x91" * 5000 + b"\xc0"])
    bad_request(raw, [PROTO, body("admin", request_id="p", op="probe", path="/tmp/a\x00b")])
    bad_request(raw, [PROTO, msgpack.packb(["status", {"request_id": "s", "x": list(range(100_001))}])])


def test_a_frame_over_the_size_cap_drops_the_connection(sup, baseline, raw) -> None:
    raw.send([PROTO, b"\x00" * (codec.MAX_FRAME_BYTES + 1)])
    assert raw.reply(1.0) is None  # ZeroMQ's MAXMSGSIZE: disconnected, never decoded
    # A frame just under the cap is decoded, and refused as what it is.
    under = Raw(f"ipc://{sup.state_dir / 'control.sock'}")
    try:
        bad_request(under, [PROTO, b"\xc1" * (codec.MAX_FRAME_BYTES - 16)])
    finally:
        under.close()


# --- connections ------------------------------------------------------------------------------


def test_a_flood_of_connections_sending_garbage(sup: RunningSupervisor, baseline) -> None:
    endpoint = f"ipc://{sup.state_dir / 'control.sock'}"
    before = log_count(sup, "client.bad_request")
    ctx = zmq.Context()
    socks = []
    start = time.monotonic()
    for i in range(300):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        for j in range(5):
            s.send_multipart([PROTO, os.urandom(16 + (i + j) % 64)])
        socks.append(s)
    # Every garbage frame is answered (BAD_REQUEST), and the supervisor keeps up with everyone.
    replies = 0
    deadline = time.monotonic() + 30
    for s in socks:
        for _ in range(5):
            if not s.poll(max(0.0, deadline - time.monotonic()) * 1000):
                break
            assert codec.decode(s.recv_multipart(), TO_CLIENT).code == "BAD_REQUEST"
            replies += 1
    elapsed = time.monotonic() - start
    for s in socks:
        s.close(0)
    ctx.term()
    assert replies == 1500
    # 1500 bad frames, but the log got a burst and a trickle, not 1500 lines.
    logged = log_count(sup, "client.bad_request") - before
    assert logged <= 20 + elapsed + 2, (logged, elapsed)
    assert any(r.get("suppressed") for r in sup.events("client.bad_request")) or logged == 1500


def test_a_client_that_never_reads_does_not_block_others(sup: RunningSupervisor, baseline) -> None:
    greedy = Raw(f"ipc://{sup.state_dir / 'control.sock'}", RCVHWM=1, RCVBUF=4096)
    try:
        frames = [PROTO, body("status", request_id="s")]
        for _ in range(5_000):  # megabytes of status replies it will never read
            greedy.send(frames)
        start = time.monotonic()
        status = sup.status()  # another client is answered at once
        assert status["models"][0]["state"] == "READY"
        result = sup.client.complete("m", "Hello", max_tokens=3)
        assert result.usage["completion_tokens"] >= 1
        assert time.monotonic() - start < 10
    finally:
        greedy.close()


# --- the worker socket ------------------------------------------------------------------------


def test_strangers_on_the_worker_socket_are_dropped_and_logged_sparingly(sup: RunningSupervisor, baseline) -> None:
    endpoint = f"ipc://{sup.state_dir / 'workers.sock'}"
    before = log_count(sup, "worker.unknown_peer")
    strangers = [Raw(endpoint, identity=os.urandom(16).hex().encode()) for _ in range(100)]
    try:
        for r in strangers:
            r.send([PROTO, body("hello", token="x" * 32, pid=1, model_id="m")])
            r.send([PROTO, b"\xc1garbage"])
            r.send([PROTO, body("final", request_id="x", text="forged", finish_reason="stop")])
        big = Raw(endpoint)
        big.send([PROTO, b"\x00" * (codec.MAX_FRAME_BYTES + 1)])  # over the cap: dropped unread
        strangers.append(big)
        wait_until(lambda: log_count(sup, "worker.unknown_peer") > before, 10, "worker.unknown_peer")
        time.sleep(0.5)
        assert not any(r.reply(0.01) for r in strangers)  # nobody is answered
    finally:
        for r in strangers:
            r.close()
    logged = log_count(sup, "worker.unknown_peer") - before
    assert 1 <= logged <= 25
    for rec in sup.events("worker.unknown_peer"):
        assert set(rec) >= {"identity_sha256"} and len(rec["identity_sha256"]) == 12


def test_an_impostor_with_a_live_workers_token_cannot_speak_for_it(sup: RunningSupervisor, baseline) -> None:
    """ROUTER refuses a second peer with an identity already connected: the stolen token buys nothing."""
    token = psutil.Process(baseline["worker_pid"]).environ()["LMX_WORKER_TOKEN"]
    impostor = Raw(f"ipc://{sup.state_dir / 'workers.sock'}", identity=token.encode())
    try:
        for _ in range(20):
            impostor.send([PROTO, b"\xc1 garbage under a stolen identity"])
        time.sleep(1.0)
    finally:
        impostor.close()
    # the baseline fixture checks: m still READY, same worker, no restart


@pytest.mark.parametrize("kind", ["msgpack", "type", "bounds"])
def test_a_worker_that_sends_garbage_is_killed_and_counted(sup: RunningSupervisor, baseline, kind: str) -> None:
    g = sup.wait_model("g", lambda m: m["state"] == "READY", 60, "READY")
    before = len(sup.client.history("g"))
    sup.trigger.write_text(kind)
    wait_until(lambda: process_gone(g["worker_pid"]), 15, "the worker killed")
    records = wait_until(lambda: (r := sup.client.history("g")) and len(r) > before and r, 15, "a crash record")
    rec = records[0]
    assert rec["code"] == "WORKER_CRASHED" and rec["cause"].startswith("protocol violation"), rec
    assert rec["signal"] == "SIGKILL" and rec["worker_pid"] == g["worker_pid"]
    assert not rec["victim"]  # counted against the model
    violations = [r for r in sup.events("worker.protocol_violation") if r.get("worker_pid") == g["worker_pid"]]
    assert len(violations) == 1
    back = sup.wait_model("g", lambda m: m["state"] == "READY" and m["worker_pid"] != g["worker_pid"], 60,
                          "READY again on a new worker")
    assert back["restarts"] == g["restarts"] + 1 and back["failures_in_window"] >= 1
    assert sup.client.complete("g", "Hello", max_tokens=2).usage["completion_tokens"] >= 1


def test_worker_messages_out_of_bounds_are_protocol_violations() -> None:
    """What the hub treats as garbage from a worker, beyond undecodable bytes (checked in-process)."""
    def decode(tag: str, **fields) -> None:
        codec.decode([PROTO, body(tag, **fields)], TO_SUPERVISOR_FROM_WORKER)

    decode("heartbeat", progress=1, phase="idle", memory={"rss_bytes": 10})
    for tag, fields in (
        ("heartbeat", {"progress": 1, "phase": "idle", "memory": {"rss_bytes": "lots"}}),
        ("heartbeat", {"progress": -1, "phase": "idle"}),
        ("heartbeat", {"progress": 1, "phase": "idle", "memory": {f"k{i}": 1 for i in range(65)}}),
        ("ready", {"revision": "r", "load_s": math.nan}),
        ("final", {"request_id": "r", "text": "", "finish_reason": "stop", "usage": {"completion_tokens": -5}}),
        ("final", {"request_id": "r", "text": "", "finish_reason": "stop", "usage": {"completion_tokens": "9"}}),
        ("chunk", {"request_id": "r", "text": "t", "tokens": -1}),
        ("chunks", {"items": [["r", "t", -1]]}),
        ("chunks", {"items": [["r", "t"]]}),
        ("chunks", {"items": [["r" * 200, "t", 1]]}),
        ("error", {"request_id": None, "code": "X" * 300, "message": "m"}),
        ("hello", {"token": "t" * 200, "pid": 1, "model_id": "m"}),
        ("hello", {"token": "t", "pid": -4, "model_id": "m"}),
        ("generate", {"request_id": "r", "model": "m", "prompt": "p"}),  # misdirected
    ):
        with pytest.raises(E.BadRequest):
            decode(tag, **fields)


def test_client_bounds_accept_what_real_clients_send() -> None:
    """The limits must not refuse a legitimate request: the gateway's shapes, long prompts, seeds."""
    for fields in (
        {"prompt": "x" * 1_000_000, "max_tokens": 4096, "temperature": 2.0, "top_p": 0.0, "seed": 2**63},
        {"prompt": None, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "stop": ["a", "b", "c", "d"], "timeout_s": 600},
        {"prompt": None, "messages": [{"role": "system", "content": None}, {"role": "user", "content": "q"}]},
    ):
        codec.decode([PROTO, gen(**fields)], TO_SUPERVISOR_FROM_CLIENT)
    json.dumps(codec.decode([PROTO, gen()], TO_SUPERVISOR_FROM_CLIENT).to_wire())


def test_cycling_sampling_values_does_not_stall_the_model(sup: RunningSupervisor, baseline, raw) -> None:
    """Regression (found by the fuzz): each new temperature or top_p recompiled mlx-lm's sampler in
    the worker (~1 s of CPU each), so a client cycling them stalled every request on the model."""
    def finish(n: int) -> None:
        finals = 0
        while finals < n:
            reply = raw.reply(30)
            assert reply is not None, "no reply"
            msg = codec.decode(reply, TO_CLIENT)
            assert msg.TAG in ("chunk", "final"), msg
            finals += msg.TAG == "final"

    raw.send([PROTO, gen(request_id="warm", temperature=0.5, top_p=0.5)])
    finish(1)  # the one compilation a worker pays
    start = time.monotonic()
    for i in range(8):
        raw.send([PROTO, gen(request_id=f"t{i}", temperature=0.61 + i / 10, top_p=0.33 + i / 20, seed=i)])
    finish(8)
    assert time.monotonic() - start < 3.0
