"""Lifecycle policies on real workers: idle TTL unload (and load again on the next request),
pinning against eviction, and `swap OLD NEW` with no moment where neither model serves."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from supervisor.admission.memory import WORKER_OVERHEAD_BYTES
from tests.harness import REPO, wait_until

ONE_MODEL_BUDGET = WORKER_OVERHEAD_BYTES + 40 * 2**20


def test_an_idle_model_is_unloaded_and_a_request_brings_it_back(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "idle", "path": str(tiny_model), "idle_ttl_s": 1.0},
                           {"id": "pin", "path": str(tiny_model), "idle_ttl_s": 1.0, "pinned": True}]).start()
    m = sup.wait_model("idle", lambda m: m["state"] == "UNLOADED", 15, "unloaded for idleness")
    assert m["idled_out"] and sup.model("pin")["state"] == "READY"  # pinned: never unloaded
    assert [e["model"] for e in sup.events("model.idle_unloaded")] == ["idle"]
    with pytest.raises(E.ModelNotReady) as info:
        sup.client.complete("idle", "Hello", max_tokens=2)
    assert "unloaded for idleness" in info.value.message and info.value.details["retry_after_s"] > 0
    sup.wait_model("idle", lambda m: m["state"] == "READY", 30, "READY again")
    assert sup.client.complete("idle", "Hello", max_tokens=2).usage["completion_tokens"] >= 1


def test_a_pinned_model_is_never_evicted(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "pin", "path": str(tiny_model), "pinned": True},
                           {"id": "new", "path": str(tiny_model), "autoload": False}],
                          supervisor={"memory_budget_bytes": ONE_MODEL_BUDGET, "evict": "lru"}).start(wait_ready=False)
    sup.wait_model("pin", lambda m: m["state"] == "READY", 30, "READY")
    sup.client.load("new")
    m = sup.wait_model("new", lambda m: m["state"] == "REJECTED", 15, "REJECTED")
    assert m["last_error"]["code"] == "INSUFFICIENT_MEMORY"
    assert sup.model("pin")["state"] == "READY" and sup.events("model.evicted") == []


async def _serve_continuously(state_dir: Path, stop: asyncio.Event) -> list:
    """Requests for OLD, back to back, while the swap happens: what each one got."""
    outcomes = []
    async with SupervisorClient(state_dir=state_dir) as client:
        while not stop.is_set():
            try:
                r = await client.complete("old", "Hello", max_tokens=2)
                outcomes.append("ok" if r.usage["completion_tokens"] >= 1 else "empty")
            except E.LmxError as exc:
                outcomes.append(exc.code.code)
    return outcomes


def test_swap_brings_new_up_first_and_never_refuses(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "old", "path": str(tiny_model)},
                           {"id": "new", "path": str(tiny_model), "autoload": False,
                            "canary": {"prompt": "Hi", "max_tokens": 3}}]).start(wait_ready=False)
    sup.wait_model("old", lambda m: m["state"] == "READY", 30, "READY")

    async def run() -> tuple[dict, list]:
        stop = asyncio.Event()
        traffic = asyncio.create_task(_serve_continuously(sup.state_dir, stop))
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            await asyncio.sleep(0)  # let traffic begin
            detail = await client.swap("old", "new")
            after = await client.complete("old", "Hello", max_tokens=2)  # served by NEW now
        stop.set()
        return detail, await traffic, after

    detail, outcomes, after = asyncio.run(run())
    assert detail == {"mode": "new first", "old": "old", "new": "new", "state": "READY"}
    assert outcomes and set(outcomes) == {"ok"}, outcomes  # no window where OLD's requests were refused
    assert after.usage["completion_tokens"] >= 1
    status = {m["id"]: m for m in sup.status()["models"]}
    assert status["old"]["state"] == "UNLOADED" and status["new"]["state"] == "READY"
    assert [e["mode"] for e in sup.events("model.swapped")] == ["new first"]


def test_swap_without_room_drains_old_first(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "old", "path": str(tiny_model)},
                           {"id": "new", "path": str(tiny_model), "autoload": False}],
                          supervisor={"memory_budget_bytes": ONE_MODEL_BUDGET}).start(wait_ready=False)
    sup.wait_model("old", lambda m: m["state"] == "READY", 30, "READY")
    out = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "swap", "old",
                          "new", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"mode": "old drained first"' in out.stdout
    wait_until(lambda: sup.model("new")["state"] == "READY", 10, "NEW READY")
    assert sup.client.complete("old", "Hello", max_tokens=2).usage["completion_tokens"] >= 1
