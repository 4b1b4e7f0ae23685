"""Admin operations that race: SIGHUP storms, load against unload, anything against a drain. One
worker per model, none untracked, nothing started while the supervisor drains."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from supervisor.operations.gate import AdminGate
from tests.harness import wait_until, workers_of


def _one_worker_each(sup) -> None:
    status = sup.status()
    tracked = {m["worker_pid"] for m in status["models"] if m["worker_pid"]}
    assert workers_of(sup.state_dir) == tracked, (workers_of(sup.state_dir), status["models"])


def _changed(tiny_model: Path, canary_timeout_s: float) -> list[dict]:
    """A new revision of model m (its canary's timeout is part of its section)."""
    return [{"id": "m", "path": str(tiny_model), "canary": {"prompt": "Hi", "timeout_s": canary_timeout_s}}]


def test_two_sighups_50ms_apart_leave_one_tracked_worker(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor(_changed(tiny_model, 60.0)).start()
    before = sup.model("m")["revision"]
    sup.rewrite(_changed(tiny_model, 61.0))
    sup.proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)  # the gap under test, not a wait for a condition
    sup.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(sup.events("config.reloaded")) == 2, 60, "both reloads")
    m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["revision"] != before, 60, "READY, new revision")
    first, second = sup.events("config.reloaded")
    assert first["changed"] == ["m"] and second["changed"] == []  # the second saw what the first left
    _one_worker_each(sup)
    assert len([e for e in sup.events("worker.spawned") if e.get("model") == "m"]) == 2  # boot + one reload
    assert sup.stop() == 0
    wait_until(lambda: not workers_of(sup.state_dir), 10, "no worker after a clean exit")
    assert m["worker_pid"] not in workers_of(sup.state_dir)


def test_sighups_200ms_apart_with_a_request_in_flight_let_it_finish(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor(_changed(tiny_model, 60.0)).start()
    sup.rewrite(_changed(tiny_model, 61.0))

    async def stream() -> tuple[object, int]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            s = client.generate("m", "Hello", max_tokens=300)
            tokens = 0
            async for chunk in s:
                tokens += chunk.tokens
                if tokens and not hupped.is_set():
                    hupped.set()
                    sup.proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.2)  # the gap under test
                    sup.proc.send_signal(signal.SIGHUP)
            return s.result, tokens

    hupped = threading.Event()
    result, tokens = asyncio.run(stream())  # a WORKER_CRASHED here would raise
    assert result is not None and result.usage["completion_tokens"] == tokens == 300
    wait_until(lambda: len(sup.events("config.reloaded")) == 2, 60, "both reloads")
    sup.wait_model("m", lambda m: m["state"] == "READY", 60, "READY on the new revision")
    _one_worker_each(sup)
    assert sup.client.history("m") == []  # the old worker was stopped, never killed as a crash
    assert sup.stop() == 0
    assert not workers_of(sup.state_dir)


async def _draining(client: SupervisorClient) -> None:
    while (state := next(m for m in (await client.status())["models"] if m["id"] == "m")["state"]) != "DRAINING":
        assert state != "UNLOADED", "the drain ended before it was seen: no race to test"
        await asyncio.sleep(0.005)  # a poll's interval, as wait_until's


def test_a_load_sent_during_an_unloads_drain_wins(make_supervisor, tiny_model: Path) -> None:
    """The operator's last word counts: before, the load found the model DRAINING, did nothing,
    and the model ended UNLOADED."""
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()

    async def race() -> tuple[dict, dict, object]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            s = client.generate("m", "Hello", max_tokens=200)
            async for _ in s:
                break
            unload = asyncio.ensure_future(client.unload("m"))
            await asyncio.wait_for(_draining(client), 30)  # the unload has begun its drain
            load = await client.load("m", timeout_s=60)
            async for _ in s:
                pass
            return await unload, load, s.result

    unloaded, loaded, result = asyncio.run(race())
    assert unloaded["state"] == "UNLOADED" and loaded["started"] is True
    assert result is not None and result.finish_reason == "length"
    m = sup.wait_model("m", lambda m: m["state"] == "READY", 60, "READY again")
    assert m["wanted"] is True
    _one_worker_each(sup)


def test_nothing_starts_while_the_supervisor_drains(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}]).start()
    sup.rewrite([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}])

    async def drain_then_hup() -> object:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            s = client.generate("a", "Hello", max_tokens=300)
            async for _ in s:
                if sup.proc.poll() is None and not sup.events("supervisor.draining"):
                    sup.proc.send_signal(signal.SIGTERM)
                    wait_until(lambda: sup.events("supervisor.draining"), 10, "the drain")
                    sup.proc.send_signal(signal.SIGHUP)
                    with pytest.raises(E.ShuttingDown):
                        await client.load("a")
            return s.result

    assert asyncio.run(drain_then_hup()) is not None
    assert sup.proc.wait(timeout=30) == 0
    spawned = [e for e in sup.events("worker.spawned")]
    assert [e["model"] for e in spawned] == ["a"]
    refused = sup.events("admin.refused")
    assert refused and refused[0]["op"] == "reload" and refused[0]["code"] == "SHUTTING_DOWN"
    assert not workers_of(sup.state_dir)


def test_the_gate_runs_operations_on_one_model_one_at_a_time_and_refuses_after_close() -> None:
    async def scenario() -> list[str]:
        gate, trace = AdminGate(), []

        async def op(name: str, *keys: str) -> None:
            async with gate.hold(*keys):
                trace.append(f"{name}+")
                await asyncio.sleep(0.01)
                trace.append(f"{name}-")

        await asyncio.gather(op("a1", "a"), op("ab", "b", "a"), op("a2", "a"), op("c", "c"))
        closing = asyncio.ensure_future(gate.close(5.0))
        await asyncio.sleep(0)  # close() has begun: the drain switch is on
        with pytest.raises(E.ShuttingDown):
            async with gate.hold("a"):
                pass
        assert await closing is True
        return trace

    trace = asyncio.run(scenario())
    a_ops = [t for t in trace if t[0] == "a"]  # in arrival order, never interleaved
    assert a_ops == ["a1+", "a1-", "ab+", "ab-", "a2+", "a2-"]


def test_closing_a_dead_worker_does_not_yield_to_the_loop(tmp_path: Path) -> None:
    # A failure's handling closes the dead worker, then goes to BACKOFF. Had the close yielded, a
    # status read in between would show READY with the dead pid, and a request sent on that word
    # would meet BACKOFF (bench/crash_latency hit exactly that).
    from supervisor import config as cfg_mod
    from supervisor.persistence.store import Store
    from supervisor.services import Services
    from supervisor.workers.handle import WorkerHandle

    config = cfg_mod.parse(f'[[models]]\nid = "m"\npath = "{tmp_path}"\n'
                           f'worker_command = ["{sys.executable}", "-c", "pass"]\n')

    class Owner:
        exited = asyncio.Event()

        def on_worker_result(self, handle, msg) -> None: ...

        def on_worker_exit(self, handle, rc) -> None:
            self.exited.set()

    async def run() -> None:
        owner = Owner()
        services = Services(config, Store(tmp_path), None, "ipc://unused")
        handle = WorkerHandle.spawn(config.models[0], services, owner)
        await asyncio.wait_for(owner.exited.wait(), 30)
        closing = handle.close("failed", 5.0)
        with pytest.raises(StopIteration):  # done in one step: it never suspended
            closing.send(None)
        await handle.close("again", 5.0)  # idempotent

    asyncio.run(run())
