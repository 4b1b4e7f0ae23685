"""How requests reach a worker's main thread: straight on its own socket (worker.channel.Inbox),
or, for a worker whose hello does not say `direct_requests`, through its IO thread. Real ZeroMQ
sockets and, for the routing, a real supervisor and workers."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from protocol import codec
from protocol.client import SupervisorClient
from protocol.messages import TO_WORKER, Cancel, GenerateRequest, Heartbeat, Shutdown
from supervisor.workers.hub import WorkerHub
from tests.harness import wait_until
from worker.channel import Inbox


@pytest.fixture
def wire(tmp_path: Path):
    """The supervisor's ROUTER and a worker main thread's DEALER (identity TOKEN/data) and Inbox."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(f"ipc://{tmp_path / 'w.sock'}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"tok/data")
    dealer.connect(f"ipc://{tmp_path / 'w.sock'}")
    dealer.send_multipart(codec.encode(Shutdown("hello")))  # so the router knows the identity
    router.recv_multipart()
    yield router, Inbox(dealer)
    dealer.close(0)
    router.close(0)
    ctx.term()


def _to_main(router: zmq.Socket, msg) -> None:
    router.send_multipart([b"tok/data", *codec.encode(msg)])


def test_requests_and_cancels_come_straight_to_the_main_thread(wire) -> None:
    router, inbox = wire
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.01)
    assert inbox.poll() is None  # the batch loop's look between steps
    _to_main(router, GenerateRequest("r1", "m", prompt="Hi", max_tokens=4))
    got = inbox.get(timeout=30)
    assert isinstance(got, GenerateRequest) and got.request_id == "r1"
    _to_main(router, Cancel("r1"))
    got = inbox.get(timeout=30)
    assert isinstance(got, Cancel) and got.request_id == "r1"


def test_what_the_io_thread_puts_wakes_a_main_thread_waiting_on_the_socket(wire) -> None:
    router, inbox = wire
    timer = threading.Timer(0.05, inbox.put, [Shutdown("from the IO thread")])
    timer.start()
    got = inbox.get(timeout=60)  # without the pipe's ring this would wait out the minute: Empty
    timer.join()
    assert isinstance(got, Shutdown) and got.reason == "from the IO thread"


def test_garbage_on_the_main_threads_socket_is_skipped(wire) -> None:
    router, inbox = wire
    router.send_multipart([b"tok/data", b"LMX/1", b"\xc1 not msgpack"])
    _to_main(router, GenerateRequest("r4", "m", prompt="Hi", max_tokens=4))
    assert inbox.get(timeout=30).request_id == "r4"


def _serves_and_cancels(sup, model: str) -> None:
    async def run() -> int:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            done = await client.complete(model, "Hello", max_tokens=40)
            victim = client.generate(model, "Hello victim", max_tokens=100_000)
            async for _ in victim:
                break
            await victim.aclose()
            return done.usage["completion_tokens"]

    assert asyncio.run(run()) == 40
    wait_until(lambda: [e for e in sup.events("request.failed") if e["model"] == model and e["code"] == "CANCELLED"],
               30, f"{model}: the victim cancelled")
    back = sup.wait_model(model, lambda m: m["active"] == 0, 30, f"{model}: the cancelled slot back")
    assert back["failures_in_window"] == 0 and back["restarts"] == 0


def test_requests_go_the_way_the_workers_hello_says(make_supervisor, tiny_model: Path) -> None:
    # Each wrapped worker takes requests one way only: a model that reaches READY (its canary
    # served) and serves and cancels was sent them that way.
    def wrapped(way: str) -> list[str]:
        return [sys.executable, "-m", "tests.older_worker", way]

    sup = make_supervisor([
        {"id": "direct", "path": str(tiny_model), "worker_command": wrapped("--direct-only")},
        {"id": "older", "path": str(tiny_model), "worker_command": wrapped("--older")},
        {"id": "older1", "path": str(tiny_model), "worker_command": wrapped("--older"), "max_batch_size": 1},
    ]).start()
    for model in ("direct", "older", "older1"):
        _serves_and_cancels(sup, model)


def test_the_hub_sends_to_a_main_thread_only_once_it_has_heard_from_it(tmp_path: Path) -> None:
    # After a supervisor restart, an orphan's IO thread may say its adoption hello before its main
    # thread's socket has reconnected: a request sent to that socket then would be dropped.
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        path = tmp_path / "workers.sock"
        hub = WorkerHub(ctx, f"ipc://{path}", path)
        hub.start()
        heard: list = []

        class Peer:
            def on_worker_message(self, msg) -> None:
                heard.append(msg)

            def on_worker_garbage(self, exc: Exception) -> None:
                raise AssertionError(exc)

        hub.register("tok", Peer())
        plain = zmq.Context()
        sockets = {}
        for name, identity in (("control", b"tok"), ("data", b"tok/data")):
            sock = sockets[name] = plain.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"ipc://{path}")

        async def heard_from(n: int) -> None:
            for _ in range(3000):  # bounded: 30 s
                if len(heard) >= n:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the hub heard nothing")

        def received(name: str):
            assert sockets[name].poll(30_000), f"nothing on the {name} socket"
            return codec.decode(sockets[name].recv_multipart(), TO_WORKER)

        try:
            sockets["control"].send_multipart(codec.encode(Heartbeat(1, "idle", {})))
            await heard_from(1)
            assert hub.send("tok", GenerateRequest("r1", "m", prompt="Hi", max_tokens=2), to_main=True) is False
            assert received("control").request_id == "r1"
            sockets["data"].send_multipart(codec.encode(Heartbeat(2, "idle", {})))
            await heard_from(2)
            assert hub.send("tok", GenerateRequest("r2", "m", prompt="Hi", max_tokens=2), to_main=True) is True
            assert received("data").request_id == "r2"
        finally:
            for sock in sockets.values():
                sock.close(0)
            plain.term()
            hub.close()
            ctx.term()

    asyncio.run(run())
