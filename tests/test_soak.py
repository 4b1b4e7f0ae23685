"""Soak: random faults against two models in a loop, then the invariants. LMX_SOAK_ROUNDS sets the
count (small by default, so CI runs it); LMX_SOAK_SEED replays a run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import workers_of

ROUNDS = int(os.environ.get("LMX_SOAK_ROUNDS", "8"))
SEED = int(os.environ.get("LMX_SOAK_SEED", str(random.randrange(1 << 30))))
FAULTS = {"none": None, "sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigabrt": signal.SIGABRT,
          "sigstop": signal.SIGSTOP}
# Every request ends in text or one of these documented codes; nothing else, never a hang.
ALLOWED = {"WORKER_CRASHED", "WORKER_HUNG", "MODEL_NOT_READY"}


@pytest.mark.soak
@pytest.mark.timeout(60 + 30 * ROUNDS)
def test_random_faults_keep_every_invariant(make_supervisor, tiny_model: Path) -> None:
    rng = random.Random(SEED)
    print(f"soak seed {SEED}, {ROUNDS} rounds")
    sup = make_supervisor(
        [{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}],
        supervisor={"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5},
        restart={"quarantine_after": 1000, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
    ).start()
    injected = {"a": 0, "b": 0}
    outcomes: list[str] = []

    async def one_round(target: str, fault: str) -> None:
        other = "b" if target == "a" else "a"
        pid = sup.model(target)["worker_pid"]
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            async def stream() -> str:
                injected_now = FAULTS[fault] is None
                try:
                    async for _ in client.generate(target, "Hello", max_tokens=400 if fault == "none" else 1500):
                        if not injected_now:
                            os.kill(pid, FAULTS[fault])
                            injected_now = True
                    return "text"
                except E.LmxError as exc:
                    return exc.code.code

            async def bystander() -> str:
                try:
                    await client.complete(other, "Hello", max_tokens=16)
                    return "text"
                except E.LmxError as exc:
                    return exc.code.code

            outcomes.extend(await asyncio.wait_for(asyncio.gather(stream(), bystander()), 30))

    for _ in range(ROUNDS):
        target, fault = rng.choice(["a", "b"]), rng.choice(list(FAULTS))
        before = sup.model(target)["worker_pid"]
        asyncio.run(one_round(target, fault))
        if fault != "none":
            injected[target] += 1
            sup.wait_model(target, lambda m: m["state"] == "READY" and m["worker_pid"] != before, 30,
                           f"{target} back after {fault}")
        assert sup.proc.poll() is None, "the supervisor exited"

    assert set(outcomes) <= {"text"} | ALLOWED, outcomes
    for model, count in injected.items():
        history = sup.client.history(model, limit=500)
        assert len(history) == count, (model, history)
        m = sup.model(model)
        assert m["restarts"] == count and m["state"] == "READY"
    assert workers_of(sup.state_dir) == {m["worker_pid"] for m in sup.status()["models"]}
