"""Safety decisions are durable before they are observable: a failure (and the quarantine it causes)
is in the store before any client hears of it, so a supervisor SIGKILLed the moment a client has
seen it comes back with that failure counted, and a quarantined model stays quarantined. Real
supervisor, real workers, real ZeroMQ; every fault from outside (a signal, a worker wrapper)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until

pytestmark = pytest.mark.timeout(240)

# Requests queued behind the one the worker serves when it dies: the supervisor fails them all,
# one by one, so the first client hears of the death while the supervisor is still busy telling
# the others. A supervisor that told them before it stored the failure dies with it unstored.
QUEUED = 300


def _kill_supervisor(sup: RunningSupervisor) -> None:
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGKILL)


async def _kill_when_a_client_hears_of_the_death(sup: RunningSupervisor) -> E.LmxError:
    client = SupervisorClient(state_dir=sup.state_dir, timeout_s=60.0)
    await client.connect()
    heard: list[E.LmxError] = []
    first = asyncio.Event()

    async def one() -> None:
        try:
            await client.complete("m", "Hello there", max_tokens=3000, timeout_s=60.0)
        except E.LmxError as exc:
            if not heard:  # the observation: at once, before anything else runs here
                _kill_supervisor(sup)
                heard.append(exc)
                first.set()

    tasks = [asyncio.create_task(one()) for _ in range(QUEUED + 1)]
    try:
        for _ in range(600):  # every request admitted: one on the worker, the rest queued
            m = next(m for m in (await client.status())["models"] if m["id"] == "m")
            if m["queued"] >= QUEUED:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"only {m['queued']} requests queued")
        os.kill(m["worker_pid"], signal.SIGKILL)  # the model fails: its worker dies mid-generation
        await asyncio.wait_for(first.wait(), 30)
        return heard[0]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def test_a_failure_a_client_has_seen_is_counted_after_the_supervisor_is_sigkilled(
    make_supervisor, tiny_model: Path
) -> None:
    sup = make_supervisor(
        [{"id": "m", "path": str(tiny_model), "max_batch_size": 1, "max_queue": QUEUED + 10}],
        supervisor={"max_requests": 2 * QUEUED, "max_requests_per_client": 2 * QUEUED},
        restart={"quarantine_after": 10, "backoff_initial_s": 5.0, "backoff_max_s": 5.0},
    ).start()
    assert sup.model("m")["failures_in_window"] == 0
    seen = asyncio.run(_kill_when_a_client_hears_of_the_death(sup))
    assert seen.code.code in ("WORKER_CRASHED", "WORKER_OOM"), seen  # a SIGKILL: either, by its memory
    assert sup.proc is not None and sup.proc.wait(timeout=30) == -signal.SIGKILL

    sup.start(wait_ready=False)  # what launchd or systemd does after the SIGKILL
    m = sup.model("m")
    assert m["failures_in_window"] == 1, f"the failure the client saw was forgotten: {m}"
    sup.wait_model("m", lambda m: m["state"] == "READY", 60, "READY again (1 failure < quarantine_after)")


def _chaos(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.chaos_worker", *args]


def test_a_quarantine_a_client_has_seen_survives_a_sigkill_and_the_model_is_never_brought_up(
    make_supervisor, tiny_model: Path
) -> None:
    # The canary passes; every client request kills the worker. One failure quarantines it (after
    # exactly n: test_chaos, and in-process).
    sup = make_supervisor(
        [{"id": "m", "path": str(tiny_model),
          "worker_command": _chaos("--at", "generate", "--signal", "SIGKILL")}],
        restart={"quarantine_after": 1, "backoff_initial_s": 0.05, "backoff_max_s": 0.1},
    ).start()
    codes = []

    def until_quarantined() -> bool:
        try:
            sup.client.complete("m", "Hello", max_tokens=4, timeout_s=30.0)
        except E.ModelQuarantined:
            _kill_supervisor(sup)  # the observation: at once
            return True
        except E.LmxError as exc:  # its crashes (WORKER_CRASHED), and MODEL_NOT_READY while it restarts
            codes.append(exc.code.code)
        return False

    wait_until(until_quarantined, 120, "MODEL_QUARANTINED")
    assert codes.count("WORKER_CRASHED") == 1
    assert sup.proc is not None and sup.proc.wait(timeout=30) == -signal.SIGKILL
    spawned = len([e for e in sup.events("worker.spawned") if e.get("model") == "m"])

    sup.start(wait_ready=False)
    # Autoload runs in the same step that logs supervisor.started: once status answers after it,
    # the restarted supervisor has decided about the model.
    wait_until(lambda: len(sup.events("supervisor.started")) == 2, 30, "the second boot")
    m = sup.model("m")
    assert m["state"] == "QUARANTINED" and m["failures_in_window"] == 1, m
    assert m["worker_pid"] is None
    with pytest.raises(E.ModelQuarantined):
        sup.client.complete("m", "Hello", max_tokens=2)
    assert len([e for e in sup.events("worker.spawned") if e.get("model") == "m"]) == spawned
