"""SupervisorClient.wait_state against a real supervisor: a state reached later is seen through the
model.state events (every state on the way, not a poll's samples), one already reached returns at
once, a deadline names the model and where it is, and a supervisor that goes away ends the wait
with SUPERVISOR_UNAVAILABLE instead of leaving it to its deadline."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import REPO

pytestmark = pytest.mark.timeout(120)


def _run(sup, scenario):
    async def go():
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=30) as client:
            return await scenario(client)

    return asyncio.run(go())


def test_a_state_reached_later_and_one_already_reached(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)

    async def scenario(client: SupervisorClient):
        seen: list[str] = []
        # The load races the wait's subscription and first read: either way the wait sees READY.
        wait = asyncio.ensure_future(client.wait_state("m", lambda m: seen.append(m["state"]) or
                                                       m["state"] == "READY", 60))
        await client.load("m")
        ready = await wait
        calls: list[str] = []
        t0 = time.monotonic()
        again = await client.wait_state("m", lambda m: calls.append(m["state"]) or m["state"] == "READY", 60)
        return seen, ready, calls, again, time.monotonic() - t0

    seen, ready, calls, again, took_s = _run(sup, scenario)
    assert ready["state"] == "READY" and ready["id"] == "m" and ready["worker_pid"]
    assert seen[-1] == "READY" and "READY" not in seen[:-1]
    # Each of the model's state events re-reads the entry: the states on the way are seen, in order.
    way = [s for s in ("STARTING", "LOADING", "CANARY") if s in seen]
    assert way and way == sorted(way, key=["STARTING", "LOADING", "CANARY"].index), seen
    assert calls == ["READY"] and again["worker_pid"] == ready["worker_pid"]
    assert took_s < 1.0, f"an already reached state took {took_s:.2f}s"
    # lmxctl load waits the same way, printing each state it sees once, with the time it took.
    sup.client.unload("m")
    run = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "load", "m"],
                         cwd=REPO, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert all(re.fullmatch(r"m: [A-Z]+ \(\d+\.\ds\)", line) for line in lines), lines
    states = [line.split()[1] for line in lines]
    assert states[-1] == "READY" and len(set(states)) == len(states), states


def test_a_deadline_names_the_model_and_its_state_and_unknown_models_are_refused(
        make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)

    async def scenario(client: SupervisorClient):
        t0 = time.monotonic()
        with pytest.raises(E.RequestTimeout) as timeout:
            await client.wait_state("m", lambda m: m["state"] == "QUARANTINED", 0.5)
        took_s = time.monotonic() - t0
        with pytest.raises(E.UnknownModel):
            await client.wait_state("nope", lambda m: True, 5)
        return timeout.value, took_s

    exc, took_s = _run(sup, scenario)
    assert "m: not in the awaited state within 0.5s (it is UNLOADED)" in exc.message, exc.message
    assert exc.details == {"model": "m", "state": "UNLOADED"}
    assert 0.5 <= took_s < 2.0, f"{took_s:.2f}s"


def test_a_supervisor_that_goes_away_ends_the_wait(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)

    async def scenario(client: SupervisorClient):
        wait = asyncio.ensure_future(client.wait_state("m", lambda m: m["state"] == "QUARANTINED", 60))
        await client.status()  # the wait has subscribed and read once by now or soon: it is waiting
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sup.stop)
        t0 = time.monotonic()
        with pytest.raises(E.SupervisorUnavailable):
            await wait
        return time.monotonic() - t0

    took_s = _run(sup, scenario)
    assert took_s < 5.0, f"the wait outlived its supervisor by {took_s:.2f}s"
