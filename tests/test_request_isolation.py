"""One bad request costs only itself: four streams on one connection run to their end while
requests beside them are refused — invalid ones with their own request id, undecodable frames
for the connection — by a real supervisor with real workers, over a raw socket and through the
client library. Plus the client's one fatal connection error (a protocol mismatch), against a
stand-in peer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Callable, ClassVar

import msgpack
import pytest
import zmq
import zmq.asyncio

from protocol import codec
from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.messages import TO_CLIENT, TO_SUPERVISOR_FROM_CLIENT, Chunk, Error, Final, GenerateRequest, Message
from tests.harness import RunningSupervisor, wait_until

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["Hello", "The quick brown fox", "What is the capital", "Numbers such as"]
# Long enough that the four are still generating when the bad requests arrive.
MAX_TOKENS = 400
HUGE = 2_000_000  # over protocol.limits.MAX_TOKENS


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("isolation"), [{"id": "tiny", "path": str(tiny_model)}])
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


def _ended(sup: RunningSupervisor, rids: set[str]) -> dict[str, dict]:
    """The supervisor's request.done / request.failed line of each of `rids`, waited for."""
    def ends() -> dict[str, dict] | None:
        found = {e["request_id"]: e for e in sup.events() if e.get("event") in ("request.done", "request.failed")
                 and e.get("request_id") in rids}
        return found if set(found) == rids else None

    return wait_until(ends, 30, f"requests {sorted(rids)} to end in the supervisor log")


def _assert_complete(chunks: str, final: Final) -> None:
    """Streamed in full and ended on its own terms, not by another request's error."""
    assert chunks == final.text
    assert final.finish_reason in ("stop", "length")
    if final.finish_reason == "length":
        assert final.usage["completion_tokens"] == MAX_TOKENS


def test_an_invalid_request_is_refused_with_its_own_id_and_the_streams_beside_it_finish(
        sup: RunningSupervisor) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{sup.state_dir / 'control.sock'}")
    good = {f"good-{i}": p for i, p in enumerate(PROMPTS)}
    texts = {rid: "" for rid in good}
    finals: dict[str, Final] = {}
    errors: dict[str | None, Error] = {}
    try:
        for rid, prompt in good.items():
            sock.send_multipart(codec.encode(GenerateRequest(rid, "tiny", messages=[{"role": "user", "content": prompt}],
                                                             max_tokens=MAX_TOKENS)))

        def read(until: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 60
            while not until():
                assert time.monotonic() < deadline, f"replies so far: {sorted(finals)}, {sorted(map(str, errors))}"
                if not sock.poll(1000):
                    continue
                msg = codec.decode(sock.recv_multipart(), TO_CLIENT)
                if isinstance(msg, Chunk):
                    texts[msg.request_id] += msg.text
                elif isinstance(msg, Final):
                    finals[msg.request_id] = msg
                else:
                    assert isinstance(msg, Error)
                    errors[msg.request_id] = msg

        read(lambda: all(texts.values()))  # every stream has begun
        # Out of bounds, unknown field, wrong type: each names its request; garbage names none.
        sock.send_multipart(codec.encode(GenerateRequest("bad-max", "tiny", "Hi", max_tokens=HUGE)))
        sock.send_multipart([codec.PROTOCOL, msgpack.packb(["generate", {"request_id": "bad-field", "model": "tiny",
                                                                          "prompt": "Hi", "colour": "red"}])])
        sock.send_multipart([codec.PROTOCOL, msgpack.packb(["generate", {"request_id": "bad-type", "model": "tiny",
                                                                          "prompt": 7}])])
        sock.send_multipart([codec.PROTOCOL, b"\xc1 not msgpack"])
        read(lambda: len(errors) == 4)
        assert not finals, "the four ended before the bad requests were answered: make them longer"
        read(lambda: len(finals) == 4)
    finally:
        sock.close(0)
        ctx.term()

    assert {rid: e.code for rid, e in errors.items()} == {
        "bad-max": "BAD_REQUEST", "bad-field": "BAD_REQUEST", "bad-type": "BAD_REQUEST", None: "BAD_REQUEST"}
    assert "max_tokens" in errors["bad-max"].message and "colour" in errors["bad-field"].message
    assert "prompt" in errors["bad-type"].message
    for rid in good:
        _assert_complete(texts[rid], finals[rid])
    ends = _ended(sup, set(good))
    assert {e["event"] for e in ends.values()} == {"request.done"}
    logged = {e.get("request_id") for e in sup.events("client.bad_request")}
    assert {"bad-max", "bad-field", "bad-type", None} <= logged
    assert sup.model("tiny")["state"] == "READY"


@dataclasses.dataclass
class NoSuchMessage(Message):
    TAG: ClassVar[str] = "no_such_message"


def test_the_client_library_fails_only_the_bad_request_on_a_shared_connection(sup: RunningSupervisor) -> None:
    async def run() -> tuple[list[tuple[str, str, Final]], E.LmxError, Error]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=60) as client:
            streams = [client.generate("tiny", messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS)
                       for p in PROMPTS]
            firsts = [await s.__anext__() for s in streams]  # all four are generating

            # Out of bounds: refused by the library itself, before the wire.
            with pytest.raises(E.BadRequest, match="max_tokens") as local:
                await client.complete("tiny", "Hi", max_tokens=HUGE)
            # What another library (or an older one) might send on this connection: an invalid
            # request with an id, answered for that id, and a frame the supervisor cannot read at
            # all, answered for no request — neither may end the four.
            bad = await client.connection.replies("raw-bad")
            await client.connection.send(GenerateRequest("raw-bad", "tiny", "Hi", max_tokens=HUGE))
            await client.connection.send(NoSuchMessage())  # no type and no id the supervisor knows
            raw_bad = await asyncio.wait_for(bad.get(), 10)

            out = []
            for s, first in zip(streams, firsts):
                text = first.text + "".join([c.text async for c in s])
                assert s.result is not None
                out.append((s.request_id, text, s.result))
            return out, local.value, raw_bad

    done, local, raw_bad = asyncio.run(run())
    assert local.code is E.ErrorCode.BAD_REQUEST
    assert isinstance(raw_bad, Error) and raw_bad.request_id == "raw-bad" and raw_bad.code == "BAD_REQUEST"
    for rid, text, result in done:
        _assert_complete(text, Final(rid, result.text, result.finish_reason, result.usage))
    assert {e["event"] for e in _ended(sup, {rid for rid, _, _ in done}).values()} == {"request.done"}


def test_a_supervisor_speaking_another_protocol_fails_every_pending_request(tmp_path: Path) -> None:
    """The one connection-level reply that concerns every request: nothing the peer sends can be read."""
    endpoint = f"ipc://{tmp_path / 'control.sock'}"

    async def run() -> tuple[list[BaseException], BaseException]:
        ctx = zmq.asyncio.Context()
        peer = ctx.socket(zmq.ROUTER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.bind(endpoint)
        try:
            async with SupervisorClient(endpoint, timeout_s=10) as client:
                calls = [asyncio.ensure_future(client.status()) for _ in range(3)]
                for _ in calls:
                    ident, *_ = await asyncio.wait_for(peer.recv_multipart(), 10)
                # One reply in a newer protocol: the other two were never answered.
                await peer.send_multipart([ident, b"LMX/9", b"\x90"])
                results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
                try:
                    await client.status()
                    raise AssertionError("a request after the mismatch was sent")
                except E.LmxError as exc:
                    after = exc
                return results, after
        finally:
            peer.close(0)
            ctx.term()

    results, after = asyncio.run(run())
    assert all(isinstance(r, E.BadRequest) and r.details.get("got") == "LMX/9" for r in results), results
    assert isinstance(after, E.BadRequest) and after.details.get("got") == "LMX/9"


def test_a_refusal_carries_the_request_id_whenever_it_can_be_read() -> None:
    def frames(fields: dict, tag: str = "generate") -> list[bytes]:
        return [codec.PROTOCOL, msgpack.packb([tag, fields])]

    table = TO_SUPERVISOR_FROM_CLIENT
    for fields, tag in [({"request_id": "r1", "model": "m", "max_tokens": HUGE}, "generate"),
                        ({"request_id": "r1", "model": 5}, "generate"),
                        ({"request_id": "r1"}, "no-such-op"),
                        ({"request_id": "r1", "nested": [[[[]]]] * 2}, "status")]:
        with pytest.raises(codec.InvalidMessage) as info:
            codec.decode(frames(fields, tag), table)
        assert info.value.request_id == "r1" and info.value.code is E.ErrorCode.BAD_REQUEST
    for fields in [{"request_id": 7, "model": "m"}, {"request_id": "x" * 500, "model": "m"}, {"model": "m"}]:
        with pytest.raises(E.BadRequest) as info:
            codec.decode(frames(fields), table)
        assert not isinstance(info.value, codec.InvalidMessage)  # no id a reply could carry
