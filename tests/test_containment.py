"""Crash containment with real processes: a worker killed mid-stream fails only its own clients."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import process_gone


def test_sigkill_mid_stream_gives_worker_crashed_and_the_other_model_keeps_serving(
    make_supervisor, tiny_model: Path
) -> None:
    sup = make_supervisor([{"id": "victim", "path": str(tiny_model)},
                           {"id": "bystander", "path": str(tiny_model)}]).start()
    victim_pid = sup.model("victim")["worker_pid"]

    async def scenario() -> tuple[E.LmxError, float, int, object]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate("victim", "Hello", max_tokens=1500)
            other = asyncio.ensure_future(client.complete("bystander", "Hello", max_tokens=64))
            seen = 0
            try:
                async for _ in stream:
                    seen += 1
                    if seen == 2:
                        killed_at = time.monotonic()
                        os.kill(victim_pid, signal.SIGKILL)
            except E.LmxError as exc:
                return exc, time.monotonic() - killed_at, seen, await other
            raise AssertionError("the stream ended without an error")

    exc, latency_s, seen, other = asyncio.run(scenario())
    assert isinstance(exc, E.WorkerCrashed)
    assert exc.details["signal"] == "SIGKILL" and exc.details["worker_pid"] == victim_pid
    assert exc.retryable and exc.http_status == 502
    assert latency_s < 2.0, f"crash reached the client after {latency_s:.3f}s"
    assert other.usage["completion_tokens"] >= 1
    # The supervisor survived, restarted the victim on a new process, and it serves again.
    restarted = sup.wait_model("victim", lambda m: m["state"] == "READY" and m["worker_pid"] != victim_pid,
                               30, "READY on a new worker")
    assert restarted["restarts"] == 1 and restarted["last_error"]["code"] == "WORKER_CRASHED"
    assert process_gone(victim_pid)
    assert sup.client.complete("victim", "Hello", max_tokens=4).usage["completion_tokens"] >= 1
    assert sup.model("bystander")["restarts"] == 0
    states = [(e["from"], e["to"]) for e in sup.events("model.state") if e["model"] == "victim"]
    assert ("READY", "BACKOFF") in states and states[-1] == ("CANARY", "READY")


def test_requests_to_a_model_that_is_not_ready_fail_at_once(make_supervisor, tiny_model: Path, tmp_path: Path) -> None:
    sup = make_supervisor([{"id": "lazy", "path": str(tiny_model), "autoload": False},
                           {"id": "missing", "path": str(tmp_path / "nowhere")}]).start(wait_ready=False)
    sup.wait_model("missing", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    for model, error in (("lazy", E.ModelNotReady), ("missing", E.SnapshotNotFound)):
        t0 = time.monotonic()
        with pytest.raises(error):
            sup.client.complete(model, "Hello", max_tokens=2)
        assert time.monotonic() - t0 < 1.0
    assert sup.model("missing")["last_error"]["code"] == "SNAPSHOT_NOT_FOUND"
    assert sup.model("missing")["worker_pid"] is None
    assert not [e for e in sup.events("worker.spawned") if e["model"] == "missing"]
    # An operator load brings the lazy one up; while it comes up, callers get retry_after_s.
    assert sup.client.load("lazy")["started"] is True
    try:
        sup.client.complete("lazy", "Hello", max_tokens=2)
    except E.ModelNotReady as exc:
        assert exc.retry_after_s is not None
    sup.wait_model("lazy", lambda m: m["state"] == "READY", 30, "READY")
    assert sup.client.complete("lazy", "Hello", max_tokens=2).usage["completion_tokens"] >= 1
    pid = sup.model("lazy")["worker_pid"]
    assert sup.client.unload("lazy")["state"] == "UNLOADED"
    assert process_gone(pid)


def test_a_failing_canary_keeps_the_model_unroutable(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "liar", "path": str(tiny_model),
                            "canary": {"prompt": "Hello", "expect": "certainly not in gibberish \u2603"}}])
    sup.start(wait_ready=False)
    m = sup.wait_model("liar", lambda m: m["last_error"] is not None, 30, "a canary verdict")
    assert m["last_error"]["code"] == "CANARY_FAILED"
    assert m["state"] in ("BACKOFF", "STARTING", "LOADING", "CANARY")
    with pytest.raises(E.ModelNotReady):
        sup.client.complete("liar", "Hello", max_tokens=2)
