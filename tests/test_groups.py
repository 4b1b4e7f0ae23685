"""Groups on one machine (docs/distributed.md): a model served by two ranks on mx.distributed's ring
over 127.0.0.1, supervised as one unit. Real worker processes, real collectives, faults from outside."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import REPO, process_gone, wait_until, workers_of
from tests.snapshots import write_tiny_llama

PROMPT = "Hello world, the capital of France"
GROUP = {"hosts": ["local", "local"]}
# Fast verdicts: a stopped rank misses its heartbeats within a second and a half.
FAST = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5}


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 with larger weights: greedy text that follows the prompt and never flips on rounding."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "llama32", dtype="float32", scale=0.2)


def rank_pids(sup) -> list[int]:
    return [r["pid"] for r in sup.model("big")["group"]]


def chaos(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "chaos_worker.py"), *args]


@pytest.mark.timeout(120)
def test_a_tensor_parallel_group_serves_what_one_worker_serves(make_supervisor, sharp_llama: Path) -> None:
    sup = make_supervisor([{"id": "big", "path": str(sharp_llama), "group": GROUP},
                           {"id": "one", "path": str(sharp_llama), "max_batch_size": 1}]).start()
    group = sup.wait_model("big", lambda m: all(r["state"] == "idle" for r in m["group"]), 10, "ranks idle")["group"]
    assert [(r["rank"], r["host"]) for r in group] == [(0, "local"), (1, "local")]
    assert all(r["pid"] and r["memory"]["rss_bytes"] > 0 for r in group), group
    assert sup.model("big")["worker_pid"] == group[0]["pid"]
    for kwargs in ({"max_tokens": 12}, {"max_tokens": 12, "stop": ["e"]}, {"max_tokens": 1}):
        alone = sup.client.complete("one", PROMPT, **kwargs)
        grouped = sup.client.complete("big", PROMPT, **kwargs)
        assert (grouped.text, grouped.finish_reason, grouped.usage["completion_tokens"]) == \
            (alone.text, alone.finish_reason, alone.usage["completion_tokens"])
    # Seeded sampling is rank 0's: the same seed, the same text, every time.
    sampled = {sup.client.complete("big", PROMPT, max_tokens=10, temperature=0.9, seed=7).text for _ in range(2)}
    assert len(sampled) == 1

    async def cancel_then_serve() -> tuple[str, str]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate("big", "Hello", max_tokens=1500)
            async for _ in stream:
                break
            await stream.aclose()
            # Two requests at once: the group takes them one after the other, in lockstep.
            a, b = await asyncio.gather(client.complete("big", PROMPT, max_tokens=12),
                                        client.complete("big", "Hello", max_tokens=6))
            return a.text, b.text

    a, _ = asyncio.run(cancel_then_serve())
    assert a == sup.client.complete("one", PROMPT, max_tokens=12).text
    pids = rank_pids(sup)
    assert sup.client.unload("big")["state"] == "UNLOADED"
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.timeout(120)
def test_a_prefix_cache_clear_reaches_every_rank_of_a_group(make_supervisor, sharp_llama: Path) -> None:
    # lmxctl cache clear on a group: each rank hears it (the group used to drop it, silently).
    sup = make_supervisor([{"id": "big", "path": str(sharp_llama), "group": GROUP}]).start()
    pids = rank_pids(sup)
    sup.client.clear_cache("big")
    wait_until(lambda: {e.get("worker_pid") for e in sup.events("worker.prefix_cache_cleared")} >= set(pids),
               30, "every rank's prefix_cache_cleared")
    assert sup.client.complete("big", PROMPT, max_tokens=3).usage["completion_tokens"] == 3
    assert rank_pids(sup) == pids  # the same ranks serve on


def fault_mid_stream(sup, fault) -> tuple[E.LmxError, float]:
    """Start a long stream of "big", call `fault()` at its third chunk: (the error it ended with,
    seconds from the fault to the error)."""
    async def scenario() -> tuple[E.LmxError, float]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            seen = 0
            try:
                async for _ in client.generate("big", "Hello", max_tokens=5000):
                    seen += 1
                    if seen == 3:
                        at = time.monotonic()
                        fault()
            except E.LmxError as exc:
                return exc, time.monotonic() - at
            raise AssertionError(f"the stream ended without an error after {seen} chunks")

    return asyncio.run(scenario())


def _kill_mid_stream(sup, rank: int, sig: int) -> tuple[E.LmxError, float]:
    victim = rank_pids(sup)[rank]
    return fault_mid_stream(sup, lambda: os.kill(victim, sig))


@pytest.mark.timeout(150)
def test_a_rank_killed_or_stopped_mid_stream_ends_the_whole_group_as_one_failure(make_supervisor,
                                                                                 sharp_llama: Path) -> None:
    sup = make_supervisor([{"id": "big", "path": str(sharp_llama), "group": GROUP}], supervisor=FAST).start()
    for n, (sig, code, budget_s) in enumerate([(signal.SIGKILL, "WORKER_CRASHED", 1.0),
                                               (signal.SIGSTOP, "WORKER_HUNG", FAST["heartbeat_timeout_s"] + 1.0)]):
        pids = rank_pids(sup)
        exc, latency_s = _kill_mid_stream(sup, 1, sig)
        assert exc.code.code == code and exc.details["rank"] == 1 and exc.details["host"] == "local"
        assert exc.details["worker_pid"] == pids[1]
        assert latency_s < budget_s, f"the client heard after {latency_s:.2f}s"
        wait_until(lambda: all(process_gone(p) for p in pids), 5, "every rank of the failed group gone")
        after = sup.wait_model("big", lambda m: m["state"] == "READY" and m["worker_pid"] not in pids, 60,
                               "READY on fresh ranks")
        assert after["restarts"] == n + 1 and after["failures_in_window"] == n + 1
        assert sup.client.complete("big", PROMPT, max_tokens=4).usage["completion_tokens"] == 4
        crash = sup.client.history("big")[0]
        assert (crash["code"], crash["rank"], crash["host"], crash["worker_pid"]) == (code, 1, "local", pids[1])
        assert f'lmx_group_rank_failures_total{{classification="{code}",host="local",model="big",rank="1"}} 1.0' \
            in sup.client.metrics()
    failed = [e for e in sup.events("group.failed") if e["model"] == "big"]
    assert [(e["rank"], e["code"]) for e in failed] == [(1, "WORKER_CRASHED"), (1, "WORKER_HUNG")]


@pytest.mark.timeout(120)
def test_a_rank_that_fails_to_load_fails_the_group_and_the_group_is_quarantined(
        make_supervisor, sharp_llama: Path) -> None:
    sup = make_supervisor([{"id": "big", "path": str(sharp_llama), "group": GROUP,
                            "worker_command": chaos("--at", "load", "--rank", "1", "--signal", "SIGSEGV")}],
                          restart={"quarantine_after": 2}).start(wait_ready=False)
    m = sup.wait_model("big", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    assert m["restarts"] == 2 and "WORKER_CRASHED" in m["last_error"]["message"]
    crashes = sup.client.history("big")
    assert len(crashes) == 2 and {(c["rank"], c["host"], c["phase"]) for c in crashes} == {(1, "local", "LOADING")}
    wait_until(lambda: not workers_of(sup.state_dir), 10, "no rank left")


ROUNDS = int(os.environ.get("LMX_GROUP_SOAK_ROUNDS", "6"))
SEED = int(os.environ.get("LMX_SOAK_SEED", str(random.randrange(1 << 30))))
FAULTS = {"none": None, "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP, "sigsegv": signal.SIGSEGV}


@pytest.mark.soak
@pytest.mark.timeout(60 + 30 * ROUNDS)
def test_group_soak_random_rank_faults_leave_no_rank_behind(make_supervisor, sharp_llama: Path) -> None:
    """LMX_GROUP_SOAK_ROUNDS rounds (6 in CI; 100 on demand), LMX_SOAK_SEED replays one."""
    rng = random.Random(SEED)
    print(f"group soak seed {SEED}, {ROUNDS} rounds")
    sup = make_supervisor([{"id": "big", "path": str(sharp_llama), "group": GROUP}], supervisor=FAST,
                          restart={"quarantine_after": 1000, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}).start()
    seen: set[int] = set()
    failures = 0
    for _ in range(ROUNDS):
        fault, rank = rng.choice(list(FAULTS)), rng.randrange(2)
        pids = rank_pids(sup)
        seen.update(pids)
        if FAULTS[fault] is None:
            assert sup.client.complete("big", PROMPT, max_tokens=8).usage["completion_tokens"] == 8
            continue
        exc, _ = _kill_mid_stream(sup, rank, FAULTS[fault])
        assert exc.code.code in ("WORKER_CRASHED", "WORKER_HUNG") and exc.details["rank"] == rank, exc
        failures += 1
        wait_until(lambda: all(process_gone(p) for p in pids), 10, "every rank of the failed group gone")
        sup.wait_model("big", lambda m: m["state"] == "READY" and m["worker_pid"] not in pids, 60, "READY again")
    assert sup.model("big")["restarts"] == failures
    live = workers_of(sup.state_dir)
    assert live == set(rank_pids(sup)), f"ranks besides the group's own: {live - set(rank_pids(sup))}"
    assert all(not psutil.pid_exists(p) or process_gone(p) for p in seen - live)
