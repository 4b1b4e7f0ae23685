"""The wire: every message round-trips, bad frames are typed BAD_REQUESTs, errors cross intact."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import msgpack
import pytest

from protocol import admin as A
from protocol import codec
from protocol import errors as E
from protocol import messages as M
from protocol import peer as P

SAMPLES = [
    M.StatusRequest("r1"),
    M.StatusReply("r1", {"pid": 1}, [{"id": "a", "state": "READY"}]),
    M.GenerateRequest("r2", "m", prompt="hi", max_tokens=5, temperature=0.7, top_p=0.9, seed=3,
                      stop=["\n"], timeout_s=2.5),
    M.GenerateRequest("r3", "m", messages=[{"role": "user", "content": "héllo"}]),
    M.GenerateRequest("r3", "m", messages=[{"role": "user", "content": "weather?"}],
                      tools=[{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
                      tool_choice="function", tool_name="get", response_format={"type": "json_object"},
                      logprobs=True, top_logprobs=2, chat_template_kwargs={"enable_thinking": False}),
    M.GenerateRequest("r3", "m", messages=[{"role": "user", "content": "think"}], thinking_budget=64,
                      parallel_tool_calls=False),
    M.CountTokens("r12", "m", messages=[{"role": "user", "content": "count me"}],
                  tools=[{"type": "function", "function": {"name": "get"}}], tool_choice="none",
                  chat_template_kwargs={"enable_thinking": False}, timeout_s=5.0),
    M.CountTokens("r12", "m", prompt="raw"),
    M.TokenCount("r12", 42),
    M.EmbedRequest("r13", "e", ["one", "two"], dimensions=8, timeout_s=5.0),
    M.EmbedRequest("r13", "e", [[101, 7592, 102]]),
    M.Embeddings("r13", 2, b"\x00" * 16, 6),
    M.RerankRequest("r14", "rr", "query", ["one", ""], timeout_s=5.0),
    M.RerankScores("r14", [1.5, -0.25], 9, [1]),
    M.Chunk("r2", "tok", 1),
    M.Chunk("r2", "", 1, reasoning="hmm", tool_calls=[{"id": "c1", "type": "function",
                                                       "function": {"name": "get", "arguments": "{}"}}],
            logprobs=[{"token": "t", "logprob": -0.5, "bytes": [116], "top_logprobs": []}]),
    M.Chunks([["r2", "tok", 1], ["r3", " more", 2]]),
    M.Chunks([["r2", "tok", 1], ["r3", "", 1, {"reasoning": "so"}]]),
    M.Final("r2", "text", "stop", {"prompt_tokens": 3, "completion_tokens": 2}, {"total_s": 0.1}),
    M.Final("r2", "", "tool_calls", {"prompt_tokens": 3, "completion_tokens": 2}, {"total_s": 0.1},
            reasoning="so", tool_calls=[{"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{}"}}]),
    M.ClearPrefixCache(),
    M.Cancel("r2"),
    M.Error("r2", "WORKER_CRASHED", "died", {"signal": "SIGKILL"}),
    M.LoadRequest("r4", "m"),
    M.UnloadRequest("r5", "m"),
    M.Ack("r4", {"state": "ADMITTING"}),
    M.AdminRequest("r6", "rollback", "m", "abc123"),
    # The typed admin wire (protocol.admin): one request per operation, typed replies.
    A.ReloadRequest("r8"), A.ReleaseRequest("r8", "m"), A.RollbackRequest("r8", "m", "abc"),
    A.RollbackRequest("r8", "m"), A.SwapRequest("r8", "m", "n"), A.ProbeRequest("r8", "/snap"),
    A.RepairRequest("r8", "m"), A.VerifyRequest("r8", "m"), A.CompatRequest("r8"), A.MetricsRequest("r8"),
    A.CacheClearRequest("r8"), A.CacheClearRequest("r8", "m"),
    A.MetricsReply("r8", "# HELP x\n"), A.VerifyReply("r8", "/snap", [{"code": "MISSING_FILE"}]),
    A.CompatReply("r8", "mlx-lm 0.1", [{"model": "m"}]), A.CacheClearReply("r8", ["m"], 2, 100),
    M.HistoryRequest("r7", "m", 10),
    M.HistoryReply("r7", "m", [{"code": "WORKER_OOM"}]),
    M.Hello("tok", 123, "m", {"python": "3.11"}),
    M.Hello("tok", 123, "m", {"python": "3.11"}, direct_requests=True, capabilities=["count_tokens"]),
    M.Hello("tok", 123, "m", {}, adopt=True, revision="abc", start_time=1.5),
    M.Adopt(42, 1234.5),
    M.Init("m", "abc", "/p", 1.0, 60.0, 0),
    M.Init("e", "abc", "/p", 1.0, 60.0, 0, kind="embed"),
    M.Ready("abc", 0.5, {"rss_bytes": 1}),
    M.Heartbeat(7, "decode", {"rss_bytes": 2}),
    M.Heartbeat(7, "idle", {"rss_bytes": 2}, {"bytes": 10, "entries": 1}),
    M.Shutdown("bye"),
    M.Init("m", "abc", "/p", 1.0, 0.0, 0, group={"rank": 1, "size": 2, "backend": "ring", "parallel": ""}),
    # The peer link (protocol.peer): an owner places, feeds and ends a rank; the member reports. The
    # rank's Init and its requests are nested messages.
    P.RankPlace("r9", "big-1", "big", "abc", "/snap", 1, 2, "ring", "tensor", {"MLX_RANK": "1"},
                [["127.0.0.1:1"], ["127.0.0.1:2"]], M.Init("big", "abc", "/snap", 0.0, 0.0, context_tokens=64),
                {"mlx": "0.1", "mlx_lm": "0.2"}),
    P.RankPlaced("r9", 5), P.RankHello("r9", 5), P.RankReady("r9", 5, 0.5, {"rss_bytes": 1}),
    P.RankBeat("r9", 5, 3, "decode", {"rss_bytes": 1}),
    P.RankExit("r9", 5, "WORKER_CRASHED", "killed by SIGKILL", {"signal": "SIGKILL"}, ["boom"]),
    P.RankSend("r10", "big-1", M.GenerateRequest("x", "big", "hi", logprobs=True)),
    P.RankEnd("r11", "big-1", "its group failed"),
]
ALL_TABLES = [M.TO_SUPERVISOR_FROM_CLIENT, M.TO_CLIENT, M.TO_WORKER, M.TO_SUPERVISOR_FROM_WORKER]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TAG)
def test_every_message_round_trips_in_each_direction_it_may_travel(msg: M.Message) -> None:
    tables = [t for t in ALL_TABLES if t.get(msg.TAG) is type(msg)]
    assert tables, f"{msg.TAG} travels in no direction"
    for table in tables:
        assert codec.decode(codec.encode(msg), table) == msg


def test_every_message_class_is_sampled() -> None:
    classes = {c for t in ALL_TABLES for c in t.values()}
    assert classes == {type(m) for m in SAMPLES}


def test_first_frame_names_protocol_and_version() -> None:
    frames = codec.encode(M.StatusRequest("r"))
    assert frames[0] == b"LMX/1"


def test_other_protocol_version_is_a_typed_mismatch() -> None:
    frames = codec.encode(M.StatusRequest("r"))
    with pytest.raises(codec.ProtocolMismatch) as info:
        codec.decode([b"LMX/2", frames[1]], M.TO_SUPERVISOR_FROM_CLIENT)
    assert info.value.code is E.ErrorCode.BAD_REQUEST
    assert info.value.details == {"expected": "LMX/1", "got": "LMX/2"}


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"LMX/1"], "expected 2 frames"),
        ([b"LMX/1", b"\xc1"], "malformed msgpack"),
        ([b"LMX/1", msgpack.packb({"t": 1})], "body must be [tag, fields]"),
        ([b"LMX/1", msgpack.packb(["nope", {}])], "unknown or misdirected"),
        ([b"LMX/1", msgpack.packb(["init", {}])], "unknown or misdirected"),  # worker-bound op
        ([b"LMX/1", msgpack.packb(["status", {}])], "missing field 'request_id'"),
        ([b"LMX/1", msgpack.packb(["status", {"request_id": 5}])], "field 'request_id' has type int"),
        ([b"LMX/1", msgpack.packb(["status", {"request_id": "r", "x": 1}])], "unknown field"),
        ([b"LMX/1", msgpack.packb(["generate", {"request_id": "r", "model": "m", "max_tokens": True}])],
         "field 'max_tokens' has type bool"),
        ([b"LMX/1", msgpack.packb(["generate", {"request_id": "r", "model": "m", "stop": ["a", 1]}])],
         "field 'stop'"),
    ],
)
def test_bad_frames_are_bad_requests(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(E.BadRequest) as info:
        codec.decode(frames, M.TO_SUPERVISOR_FROM_CLIENT)
    assert fragment in info.value.message


def test_oversized_body_is_refused() -> None:
    body = msgpack.packb(["status", {"request_id": "x" * (codec.MAX_FRAME_BYTES + 1)}])
    with pytest.raises(E.BadRequest, match="exceeds"):
        codec.decode([codec.PROTOCOL, body], M.TO_SUPERVISOR_FROM_CLIENT)


def test_float_fields_accept_integers_but_int_fields_refuse_floats() -> None:
    ok = msgpack.packb(["generate", {"request_id": "r", "model": "m", "prompt": "p", "temperature": 1}])
    assert codec.decode([codec.PROTOCOL, ok], M.TO_SUPERVISOR_FROM_CLIENT).temperature == 1
    bad = msgpack.packb(["generate", {"request_id": "r", "model": "m", "max_tokens": 1.5}])
    with pytest.raises(E.BadRequest):
        codec.decode([codec.PROTOCOL, bad], M.TO_SUPERVISOR_FROM_CLIENT)


def test_error_table_matches_the_brief() -> None:
    expected = {
        "BAD_REQUEST": (False, 400), "UNAUTHORIZED": (False, 401), "UNKNOWN_MODEL": (False, 404),
        "SNAPSHOT_NOT_FOUND": (False, 424), "SNAPSHOT_INCOMPLETE": (False, 424),
        "SNAPSHOT_CORRUPT": (False, 424), "CONFIG_INVALID": (False, 424),
        "UNSUPPORTED_ARCHITECTURE": (False, 422), "COMPAT_KNOWN_BAD": (False, 422),
        "INSUFFICIENT_MEMORY": (True, 507), "LOAD_FAILED": (True, 503), "LOAD_TIMEOUT": (True, 503),
        "CANARY_FAILED": (True, 503), "CANARY_TIMEOUT": (True, 503), "MODEL_NOT_READY": (True, 503),
        "MODEL_QUARANTINED": (False, 503), "WORKER_CRASHED": (True, 502), "WORKER_OOM": (True, 507),
        "WORKER_HUNG": (True, 504), "REQUEST_TIMEOUT": (True, 504), "CANCELLED": (False, 499),
        "OVERLOADED": (True, 429), "SHUTTING_DOWN": (True, 503), "INTERNAL": (False, 500),
        "SUPERVISOR_UNAVAILABLE": (True, 503),
        # Beyond the BRIEF's table: a group's lost member host (issue 18, docs/distributed.md).
        "PEER_UNAVAILABLE": (True, 503),
    }
    assert {c.code: (c.retryable, c.http_status) for c in E.ErrorCode} == expected


@pytest.mark.parametrize("code", list(E.ErrorCode), ids=lambda c: c.code)
def test_each_code_has_an_exception_that_survives_the_wire(code: E.ErrorCode) -> None:
    exc = E.error_class(code)("boom", retry_after_s=1.5)
    wire = M.Error.from_exc("r", exc)
    back = codec.decode(codec.encode(wire), M.TO_CLIENT)
    again = back.to_exc()
    assert type(again) is type(exc)
    assert (again.code, again.message, again.retry_after_s) == (code, "boom", 1.5)
    assert again.retryable == code.retryable and again.http_status == code.http_status


def test_unknown_code_from_a_newer_peer_becomes_internal() -> None:
    assert isinstance(E.LmxError.from_wire("SOMETHING_NEW", "x"), E.InternalError)


def test_message_fields_are_plain_data() -> None:
    for msg in SAMPLES:
        left_off = {f.name for f in dataclasses.fields(msg)} - set(msg.to_wire())
        # Only fields added later, and only at their defaults, stay off the wire.
        assert all("added" in f.metadata and getattr(msg, f.name) == f.metadata["added"]()
                   for f in dataclasses.fields(msg) if f.name in left_off)


@dataclasses.dataclass
class OldGenerateRequest(M.Message):  # GenerateRequest as it shipped before the agent fields
    TAG: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = dataclasses.field(default_factory=list)
    timeout_s: Optional[float] = None

@dataclasses.dataclass
class OldFinal(M.Message):
    TAG: ClassVar[str] = "final"
    request_id: str
    text: str
    finish_reason: str
    usage: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)


def test_fields_added_later_stay_off_the_wire_at_their_defaults() -> None:
    """A peer from before a field refuses unknown fields: a message that does not use the new fields
    must read as it did (an adopted older worker, an older client)."""
    plain = M.GenerateRequest("r", "m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert M.from_wire(OldGenerateRequest, plain.to_wire()).max_tokens == 3
    assert M.from_wire(OldFinal, M.Final("r", "t", "stop", {"prompt_tokens": 1}).to_wire()).text == "t"
    with pytest.raises(E.BadRequest, match="unknown field"):  # and a request that uses them says so
        M.from_wire(OldGenerateRequest, M.GenerateRequest("r", "m", prompt="x", logprobs=True).to_wire())


def test_a_nested_message_is_decoded_with_its_own_type_checks_and_bounds() -> None:
    """The peer link nests real messages: a wrong field inside one is refused naming its path, and
    the request a rank is sent is bounded as any generation."""
    place = next(m for m in SAMPLES if isinstance(m, P.RankPlace))
    for init, words in (({**place.init.to_wire(), "context_tokens": "64"}, "'init.context_tokens' has type str"),
                        ({"path": "/x"}, "missing field 'init.model_id'"),
                        ({**place.init.to_wire(), "evil": 1}, "unknown field(s) ['init.evil']"),
                        (3, "'init' must be a map")):
        body = msgpack.packb(["rank_place", {**place.to_wire(), "init": init}], use_bin_type=True)
        with pytest.raises(codec.InvalidMessage) as err:
            codec.decode([codec.PROTOCOL, body], M.TO_SUPERVISOR_FROM_CLIENT)
        assert words in err.value.message and err.value.request_id == "r9", err.value.message
    huge = P.RankSend("r10", "big-1", M.GenerateRequest("x", "big", "hi", max_tokens=1 << 30))
    with pytest.raises(E.BadRequest, match="max_tokens"):
        codec.decode(codec.encode(huge), M.TO_SUPERVISOR_FROM_CLIENT)
    send = next(m for m in SAMPLES if isinstance(m, P.RankSend))
    assert isinstance(codec.decode(codec.encode(send), M.TO_SUPERVISOR_FROM_CLIENT).request, M.GenerateRequest)
