"""A request's priority (an API key's, carried as GenerateRequest.priority): in one model's queue,
interactive requests go to the worker before batch ones that came first; the priority never
reaches the worker. The queue's order is pure logic, tested in process with a recording `send`;
the end-to-end order through a real gateway and supervisor is the second test."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway import apikeys
from protocol import errors as E
from protocol.messages import Final, GenerateRequest
from supervisor.lifecycle.requests import RequestQueue
from tests.harness import RunningSupervisor, wait_until
from tests.test_gateway import GatewayProcess

pytestmark = pytest.mark.timeout(90)


def test_interactive_requests_overtake_waiting_batch_ones() -> None:
    async def run() -> list[str]:
        sent: list[GenerateRequest] = []
        q = RequestQueue("m", lambda m: sent.append(m) or True, max_active=1)
        origin: dict[str, str] = {}
        for name, prio in (("b1", "batch"), ("b2", "batch"), ("i1", "interactive"), ("b3", "batch"),
                           ("i2", "interactive")):
            wrid = q.add(GenerateRequest(name, "m", prompt="x", priority=prio), lambda _: None)
            origin[wrid] = name
        order = []
        while sent:
            msg = sent.pop(0)
            assert msg.priority == "interactive" and "priority" not in msg.to_wire()
            order.append(origin[msg.request_id])
            q.on_result(Final(msg.request_id, "stop", {}))
        return order

    assert asyncio.run(run()) == ["b1", "i1", "i2", "b2", "b3"]


def test_a_priority_outside_the_two_is_bad_request() -> None:
    from protocol import limits

    with pytest.raises(E.BadRequest):
        limits.check(GenerateRequest("r", "m", prompt="x", priority="urgent"))


def test_a_batch_key_waits_behind_an_interactive_one_through_the_gateway(tmp_path: Path, tiny_model: Path) -> None:
    sup = RunningSupervisor(tmp_path / "sup", [{"id": "a", "path": str(tiny_model), "max_batch_size": 1}])
    try:
        sup.start()
        store = apikeys.path_in(sup.state_dir)
        _, bulk = apikeys.create(store, "bulk", priority="batch")
        _, chat = apikeys.create(store, "chat")
        gateway = GatewayProcess(tmp_path / "gw", sup.state_dir)
        done: list[tuple[str, float]] = []

        def call(key: str, name: str, max_tokens: int) -> None:
            r = httpx.post(f"{gateway.url}/v1/completions", timeout=60, headers={"x-api-key": key},
                           json={"model": "a", "prompt": "Once", "max_tokens": max_tokens})
            assert r.status_code == 200, r.text
            done.append((name, time.monotonic()))

        threads = [threading.Thread(target=call, args=(bulk, f"bulk{i}", 1500)) for i in range(3)]
        for t in threads:
            t.start()
        # The first bulk request runs, the other two wait: then the chat arrives.
        wait_until(lambda: sup.model("a")["queued"] >= 2, 10, "two bulk requests waiting")
        call(chat, "chat", 4)
        for t in threads:
            t.join()
        order = [name for name, _ in sorted(done, key=lambda x: x[1])]
        assert order.index("chat") <= 1, order  # behind the one already running, ahead of the waiting two
        assert gateway.stop() == 0
    finally:
        sup.cleanup()


def test_a_cancel_at_the_deadline_is_the_deadline() -> None:
    """The client's own backstop timer may fire as the supervisor's deadline passes: that cancel
    reads REQUEST_TIMEOUT, never CANCELLED (one code for one cause)."""
    async def run() -> list:
        told: list = []
        q = RequestQueue("m", lambda m: True, max_active=1)
        late = q.add(GenerateRequest("r1", "m", prompt="x", timeout_s=0.01), told.append)
        early = q.add(GenerateRequest("r2", "m", prompt="x", timeout_s=60), told.append)
        time.sleep(0.02)  # the loop is held: the deadline passes before its timer can run
        q.cancel(late)
        q.cancel(early)
        return told

    late_msg, early_msg = asyncio.run(run())
    assert late_msg.code == "REQUEST_TIMEOUT" and early_msg.code == "CANCELLED"
