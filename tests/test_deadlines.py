"""A deadline that passes is one code, REQUEST_TIMEOUT, for the client and in the supervisor's log and
metrics alike. The client library's own timer is a backstop a little after the deadline: were it
the same instant it would win (it starts before the request is sent), cancel the request, and the
supervisor would count a passed deadline as CANCELLED."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until

pytestmark = pytest.mark.timeout(120)

ROUNDS = 6


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    # Every client request waits 1.5 s in the worker before it runs (the canary does not).
    slow = [sys.executable, "-m", "tests.chaos_worker", "--at", "generate", "--stall-s", "1.5"]
    s = RunningSupervisor(tmp_path_factory.mktemp("deadlines"),
                          [{"id": "slow", "path": str(tiny_model), "worker_command": slow}])
    try:
        yield s.start()
    finally:
        s.cleanup()


def test_a_passed_deadline_is_request_timeout_for_the_client_and_the_supervisor(sup: RunningSupervisor) -> None:
    async def run() -> list[str]:
        client = SupervisorClient(state_dir=sup.state_dir, timeout_s=30.0)
        ids = []
        try:
            for _ in range(ROUNDS):
                stream = client.generate("slow", "Hello", max_tokens=4, timeout_s=0.3)
                with pytest.raises(E.RequestTimeout):
                    await stream.collect()
                ids.append(stream.request_id)
        finally:
            await client.close()
        return ids

    ids = asyncio.run(run())

    def ends() -> dict[str, str] | None:
        found = {e["request_id"]: e.get("code", "ok") for e in sup.events()
                 if e.get("event") in ("request.failed", "request.done") and e.get("request_id") in ids}
        return found if len(found) == len(ids) else None

    codes = wait_until(ends, 30, "every request's end in the supervisor's log")
    assert set(codes.values()) == {"REQUEST_TIMEOUT"}, codes
    counted = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
               for line in sup.client.metrics().splitlines() if line.startswith("lmx_requests_total{")}
    assert counted == {'model="slow",outcome="REQUEST_TIMEOUT"': float(ROUNDS)}, counted
