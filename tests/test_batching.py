"""Serving under load on a real worker: continuous batching (streams interleave), cancellation and
deadlines that leave the rest of the batch alone, and bounded queues that say OVERLOADED at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq

from protocol import codec
from protocol import endpoint as ep
from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.messages import TO_CLIENT, Chunk, Final, GenerateRequest
from tests.harness import RunningSupervisor, wait_until


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(
        tmp_path_factory.mktemp("batching"),
        [{"id": "b", "path": str(tiny_model), "max_batch_size": 8},
         {"id": "one", "path": str(tiny_model), "max_batch_size": 1, "max_queue": 1, "stream_interval_s": 0.0},
         # Every token its own message: a reader that stops reading fills its buffer in seconds.
         {"id": "every", "path": str(tiny_model), "max_batch_size": 8, "stream_interval_s": 0.0}],
        supervisor={"max_requests_per_client": 12, "client_buffer_messages": 256},
    ).start()
    yield s
    s.cleanup()


async def _collect(client: SupervisorClient, model: str, tag: int, log: list, **kw):
    stream = client.generate(model, f"Hello number {tag}", **kw)
    async for _ in stream:
        log.append((time.monotonic(), tag))
    return stream.result


def _interleaved(log: list, a: int, b: int) -> bool:
    a_times = [t for t, tag in log if tag == a]
    return any(a_times[0] < t < a_times[-1] for t, tag in log if tag == b)


def test_concurrent_streams_are_decoded_together(sup: RunningSupervisor) -> None:
    async def run(model: str) -> tuple[list, list]:
        log: list = []
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            results = await asyncio.gather(*(_collect(client, model, i, log, max_tokens=40) for i in range(6)))
        return results, log

    results, log = asyncio.run(run("b"))
    assert [r.usage["completion_tokens"] for r in results] == [40] * 6
    assert all(r.finish_reason == "length" and r.text for r in results)
    assert sum(_interleaved(log, 0, i) for i in range(1, 6)) >= 3  # batched, not one after another

    # The same prompts one at a time (max_batch_size 1) never interleave, and give the same greedy text.
    serial_results = []
    for i in range(2):
        serial_results.append(sup.client.complete("one", f"Hello number {i}", max_tokens=40))
    assert [r.text for r in serial_results] == [r.text for r in results[:2]]


def test_a_cancel_leaves_the_rest_of_the_batch_alone(sup: RunningSupervisor) -> None:
    async def run() -> tuple[list, int]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            log: list = []
            others = [asyncio.create_task(_collect(client, "b", i, log, max_tokens=60)) for i in range(3)]
            victim = client.generate("b", "Hello victim", max_tokens=2000)
            seen = 0
            async for _ in victim:
                seen += 1
                if seen == 5:
                    break
            await victim.aclose()
            return await asyncio.gather(*others), seen

    results, seen = asyncio.run(run())
    assert seen == 5
    assert [r.usage["completion_tokens"] for r in results] == [60] * 3
    # Logged when the cancel arrives or, if the client closed before its cancel went out, at the
    # next chunk, when the supervisor finds the client gone.
    wait_until(lambda: [e for e in sup.events("request.failed") if e["model"] == "b" and e["code"] == "CANCELLED"],
               10, "the victim's CANCELLED")
    # The slot comes back when the worker confirms the cancel, within one decode step of it.
    back = sup.wait_model("b", lambda m: m["active"] == 0, 10, "the cancelled sequence's slot back")
    assert back["failures_in_window"] == 0


def test_a_deadline_ends_one_request_not_the_batch(sup: RunningSupervisor) -> None:
    async def run() -> tuple[object, list]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            log: list = []
            others = [asyncio.create_task(_collect(client, "b", i, log, max_tokens=50)) for i in range(2)]
            late = asyncio.create_task(_collect(client, "b", 9, log, max_tokens=5000, timeout_s=0.5))
            done = await asyncio.gather(late, return_exceptions=True)
            return done[0], await asyncio.gather(*others)

    late, results = asyncio.run(run())
    assert isinstance(late, E.RequestTimeout)
    assert [r.usage["completion_tokens"] for r in results] == [50] * 2
    m = sup.model("b")
    assert m["state"] == "READY" and m["failures_in_window"] == 0


def test_a_full_queue_is_overloaded_at_once(sup: RunningSupervisor) -> None:
    async def run() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            tasks = [asyncio.create_task(client.complete("one", "Hello", max_tokens=200)) for _ in range(4)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    start = time.monotonic()
    outcomes = asyncio.run(run())
    overloaded = [o for o in outcomes if isinstance(o, E.Overloaded)]
    assert len(overloaded) == 2  # one running + one queued (max_queue 1); the rest turned away
    assert all(o.details["retry_after_s"] > 0 for o in overloaded)
    assert sum(1 for o in outcomes if not isinstance(o, Exception)) == 2
    assert time.monotonic() - start < 60


def test_a_client_past_its_limit_is_overloaded(sup: RunningSupervisor) -> None:
    async def run() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            tasks = [asyncio.create_task(client.complete("b", "Hello", max_tokens=30)) for _ in range(14)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert sum(isinstance(o, E.Overloaded) for o in outcomes) == 2  # max_requests_per_client = 12
    assert sum(not isinstance(o, Exception) for o in outcomes) == 12


class RawClient:
    """A client on a bare DEALER socket, so a test decides when it reads and when it goes away."""

    def __init__(self, state_dir: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(ep.control_endpoint(state_dir))

    def generate(self, rid: str, max_tokens: int, model: str = "b") -> None:
        self.sock.send_multipart(codec.encode(GenerateRequest(rid, model, prompt="Hello", max_tokens=max_tokens)))

    def stream(self, rid: str, max_tokens: int, model: str) -> tuple[list[Chunk], Final]:
        self.generate(rid, max_tokens, model)
        chunks = []
        while not isinstance(msg := self.recv(), Final):
            assert isinstance(msg, Chunk), msg
            chunks.append(msg)
        return chunks, msg

    def recv(self, timeout_s: float = 30.0):
        assert self.sock.poll(int(timeout_s * 1000)), "no reply"
        return codec.decode(self.sock.recv_multipart(), TO_CLIENT)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _failed(sup: RunningSupervisor, rid: str) -> list[dict]:
    return [e for e in sup.events("request.failed") if e["request_id"] == rid]


def test_a_client_that_disconnects_mid_stream_has_its_request_cancelled(sup: RunningSupervisor) -> None:
    raw = RawClient(sup.state_dir)
    raw.generate("gone-1", max_tokens=100_000)
    assert isinstance(raw.recv(), Chunk)
    raw.close()  # the connection closes, as when the client process dies
    failed = wait_until(lambda: _failed(sup, "gone-1"), 30, "the request to end once its client is gone")
    assert failed[0]["code"] == "CANCELLED"
    assert [e for e in sup.events("client.gone_cancelled") if e["request_id"] == "gone-1"]
    # The slot comes back when the worker confirms the cancel, within one decode step of it.
    m = sup.wait_model("b", lambda m: m["active"] == 0, 10, "the cancelled sequence's slot back")
    assert m["state"] == "READY" and m["failures_in_window"] == 0


def test_a_client_that_stops_reading_is_cancelled_and_never_stalls_the_others(sup: RunningSupervisor) -> None:
    # A reader that never reads: once the kernel's socket buffer and then client_buffer_messages
    # (256 here) are full, its request is cancelled; a stream with a hole is never sent.
    raw = RawClient(sup.state_dir)
    try:
        raw.generate("slow-1", max_tokens=200_000, model="every")
        done = sup.client.complete("every", "Hello meanwhile", max_tokens=30)  # served while it hogs
        assert done.usage["completion_tokens"] == 30
        failed = wait_until(lambda: _failed(sup, "slow-1"), 120, "the slow reader's request to be cancelled")
        assert failed[0]["code"] == "CANCELLED"
        assert [e for e in sup.events("client.slow_reader_cancelled") if e["request_id"] == "slow-1"]
        m = sup.wait_model("every", lambda m: m["active"] == 0, 10, "the cancelled sequence's slot back")
        assert m["state"] == "READY" and m["failures_in_window"] == 0
    finally:
        raw.close()


@pytest.mark.parametrize("model", ["b", "one"])
def test_the_first_token_goes_at_once_and_later_ones_together(sup: RunningSupervisor, model: str) -> None:
    # The tiny model makes a token every ~1-2 ms here: at the default 50 ms interval many go per
    # message; at 0 ("one") each goes as it comes. Messages counted on a bare socket (the client
    # library would merge what queued up while it was busy).
    raw = RawClient(sup.state_dir)
    try:
        chunks, final = raw.stream(f"paced-{model}", 200, model)
    finally:
        raw.close()
    assert final.usage["completion_tokens"] == 200
    assert sum(c.tokens for c in chunks) == 200
    assert chunks[0].tokens == 1
    assert "".join(c.text for c in chunks) == final.text
    if model == "b":
        assert len(chunks) < 200 / 2
    else:
        assert all(c.tokens == 1 for c in chunks)
