"""Lifecycle events on the PUB socket: the client library follows a load to READY and a crash
record after a real SIGKILL; `lmxctl events` prints them for operators and scripts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from protocol.client import SupervisorClient
from tests.harness import REPO


async def _until(stream, predicate, limit: int = 50) -> list[dict]:
    seen = []
    for _ in range(limit):
        ev = await stream.next(30)
        seen.append(ev)
        if predicate(ev):
            return seen
    raise AssertionError(f"no matching event in {limit}: {seen}")


def test_client_follows_a_load_and_a_crash(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=60) as client:
            async with client.events("model.") as stream:
                await stream.connected()
                await client.load("m")
                load = await _until(stream, lambda e: e["event"] == "model.state" and e["to"] == "READY")
                pid = load[-1]["worker_pid"]
                os.kill(pid, signal.SIGKILL)
                crash = await _until(stream, lambda e: e["event"] == "model.state" and e["to"] == "READY")
                return load, crash

    load, crash = asyncio.run(scenario())
    assert [e["to"] for e in load] == ["ADMITTING", "STARTING", "LOADING", "CANARY", "READY"]
    assert all(e["model"] == "m" and isinstance(e["ts"], float) for e in load)
    assert [e["seq"] for e in load] == sorted(e["seq"] for e in load)
    (failed,) = [e for e in crash if e["event"] == "model.failed"]
    assert failed["code"] == "WORKER_CRASHED" and failed["signal"] == "SIGKILL"
    assert failed["worker_pid"] == load[-1]["worker_pid"] and failed["phase"] == "READY"
    assert [e["to"] for e in crash if e["event"] == "model.state"][:2] == ["BACKOFF", "STARTING"]


def test_lmxctl_events_prints_state_changes(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()
    follower = subprocess.Popen(
        [sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "events", "model.state",
         "--model", "m", "--count", "2", "--json", "--idle-timeout", "30"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stderr.readline().startswith("following events from ipc://")
        sup.client.unload("m")
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["from"], e["to"]) for e in events] == [
        ("model.state", "READY", "DRAINING"), ("model.state", "DRAINING", "UNLOADED")]
