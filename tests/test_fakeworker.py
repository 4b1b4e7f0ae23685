"""The in-process fakes (tests/fakeworker.py) are what the lifecycle tests stand on: they implement
the Worker and WorkerFactory protocols as the real classes do, and do what they are scripted to."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest

from protocol import errors as E
from protocol.messages import Adopt, ClearPrefixCache, Final, GenerateRequest, Init, Message, Shutdown, TokenCount
from supervisor import config as cfg_mod
from supervisor.config import ModelConfig, SupervisorSettings
from supervisor.persistence.records import WorkerRecord
from supervisor.workers.factory import LocalFactory, WorkerFactory
from supervisor.workers.group import RankGroup
from supervisor.workers.handle import WorkerHandle
from supervisor.workers.process import WorkerProcess
from supervisor.workers.worker import GroupMember, ProcessView, Worker
from tests.fakeworker import FakeFactory, FakeHost, FakeWorker

pytestmark = pytest.mark.timeout(20)

CFG = ModelConfig(id="m", path="/models/m")
SUP = SupervisorSettings(handshake_timeout_s=0.2, load_timeout_s=0.2)


class Owner:
    def __init__(self) -> None:
        self.results: list[Message] = []
        self.exits: list[tuple[Any, int | None]] = []

    def on_worker_result(self, worker: Any, msg: Message) -> None:
        self.results.append(msg)

    def on_worker_exit(self, worker: Any, rc: int | None) -> None:
        self.exits.append((worker, rc))


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def _public(cls: type) -> dict[str, Any]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")}


def _params(fn: Any) -> list[str]:
    fn = fn.fget if isinstance(fn, property) else fn
    return list(inspect.signature(fn).parameters) if callable(fn) else []


@pytest.mark.parametrize("impl", [FakeWorker, WorkerHandle, RankGroup])
def test_each_worker_kind_has_the_protocols_methods_with_their_parameters(impl: type) -> None:
    # Its fields and figures (process, handshake, memory, ...) are checked on live workers below.
    for name, member in _public(Worker).items():
        if callable(member):
            assert _params(getattr(impl, name, None)) == _params(member), f"{impl.__name__}.{name}"


def test_a_real_worker_and_a_real_group_are_workers_before_they_spawn(tmp_path: Path) -> None:
    config = cfg_mod.parse(f'[[models]]\nid = "one"\npath = "{tmp_path}"\n'
                           f'[[models]]\nid = "big"\npath = "{tmp_path}"\ngroup = {{hosts = ["local", "local"]}}\n')
    host = FakeHost(config, tmp_path)

    async def scenario() -> None:
        one, big = config.models
        loop = asyncio.get_running_loop()
        handle = WorkerHandle(WorkerProcess(one, host.worker_endpoint, "t", loop, lambda *_: None), host, Owner())
        assert isinstance(handle, Worker) and isinstance(handle.process, ProcessView)
        group = RankGroup(big, host, Owner())
        assert (tmp_path / "groups" / "big.hostfile.json").exists()
        for rank in group.ranks:  # what spawn() would do, with in-process ranks
            rank.handle = FakeWorker(big, group)
            assert isinstance(rank.handle, GroupMember)
        assert isinstance(group, Worker) and group.status() is not None

    _run(scenario())


@pytest.mark.parametrize("impl", [FakeFactory, LocalFactory])
def test_each_factory_has_the_protocols_methods_with_their_parameters(impl: type) -> None:
    for name, member in _public(WorkerFactory).items():
        assert _params(getattr(impl, name)) == _params(member), f"{impl.__name__}.{name}"
    assert inspect.iscoroutinefunction(impl.prove)


def test_a_fake_worker_is_a_worker_and_comes_up_a_step_after_each_cause() -> None:
    async def scenario() -> None:
        owner = Owner()
        factory: WorkerFactory = FakeFactory()
        w = factory.spawn(CFG, owner)
        assert isinstance(w, Worker)
        assert w.handshake.greeting is None  # not inside the call that made it
        await w.greet(factory.init(CFG), SUP)
        assert w.handshake.greeting is not None and w.knows("count_tokens")
        assert isinstance(w.told[0], Init) and w.loaded is None
        await w.load(SUP)
        assert w.loaded.load_s == 0.5 and w.memory["rss_bytes"] > 0 and w.status() is None

    _run(scenario())


def test_a_fake_worker_that_is_told_to_wait_times_out_or_fails_its_load_as_scripted() -> None:
    async def scenario() -> None:
        factory = FakeFactory(hello=False)
        factory.next_worker(ready=E.LoadFailed("no weights"))
        w = factory.spawn(CFG, Owner())
        with pytest.raises(E.LoadTimeout, match="no hello within handshake_timeout_s=0.2"):
            await w.greet(factory.init(CFG), SUP)
        w.say_hello()
        await w.greet(factory.init(CFG), SUP)
        with pytest.raises(E.LoadFailed, match="no weights"):
            await w.load(SUP)
        assert w.death is None  # an error it sent, not a death

        w2 = FakeFactory(ready=False).spawn(CFG, Owner())
        await w2.greet(factory.init(CFG), SUP)
        with pytest.raises(E.LoadTimeout, match="no ready within load_timeout_s=0.2"):
            await w2.load(SUP)

    _run(scenario())


def test_a_fake_worker_answers_requests_a_step_later_and_records_what_it_was_sent_and_told() -> None:
    async def scenario() -> None:
        owner = Owner()
        w = FakeWorker(CFG, owner)
        req = GenerateRequest("r1", "m", prompt="hi")
        assert w.send(req) and owner.results == []
        await asyncio.sleep(0)
        assert owner.results == [Final("r1", "ok", "stop", {"prompt_tokens": 3, "completion_tokens": 1})]
        w.answer = lambda msg: [TokenCount(msg.request_id, 7)]
        w.send(GenerateRequest("r2", "m", prompt="hi"))
        w.tell(ClearPrefixCache())
        await asyncio.sleep(0)
        assert owner.results[-1] == TokenCount("r2", 7)
        assert [m.TAG for m in w.sent] == ["generate", "generate"] and w.told == [ClearPrefixCache()]
        w.answer = None
        w.send(GenerateRequest("r3", "m", prompt="hi"))
        await asyncio.sleep(0)
        assert len(owner.results) == 2  # unanswered: still in flight

    _run(scenario())


def test_a_fake_worker_dies_on_command_with_its_death_and_fails_its_handshake() -> None:
    async def scenario() -> None:
        owner = Owner()
        w = FakeWorker(CFG, owner, pid=7, hello=False)
        w.die(E.ErrorCode.WORKER_OOM, "bad_alloc", rc=3)
        assert owner.exits == [(w, 3)] and w.death is not None
        assert w.death.code is E.ErrorCode.WORKER_OOM and w.death.pid == 7
        with pytest.raises(E.WorkerOOM, match=r"worker pid 7 died \(exit code 3\): bad_alloc"):
            await w.handshake.hello
        assert w.send(GenerateRequest("r", "m", prompt="x")) is False and w.refused
        w.die()  # dead already: nothing more happens
        assert len(owner.exits) == 1

        g = FakeFactory().place_group(ModelConfig(id="g", path="/g"), owner, Init("g", "r", "/g", 1.0, 0.0))
        assert [r["rank"] for r in g.status() or []] == [0, 1]
        g.die(E.ErrorCode.PEER_UNAVAILABLE, "link lost", rank=1, host="b")
        err = g.death.error() if g.death else None
        assert err is not None and err.message.startswith("rank 1 on b: ") and err.details["host"] == "b"

    _run(scenario())


def test_closing_a_fake_worker_is_idempotent_and_its_exit_is_no_death() -> None:
    async def scenario() -> None:
        owner = Owner()
        w = FakeWorker(CFG, owner)
        await w.close("stop", 1.0)
        await w.close("again", 1.0)
        assert w.closed and w.death is None and owner.exits == [(w, 0)] and w.closes == ["stop", "again"]
        w.die()
        assert w.death is None and len(owner.exits) == 1
        assert w.send(Shutdown("x")) is False

    _run(scenario())


def test_the_fake_factory_records_and_does_as_it_is_told() -> None:
    async def scenario() -> None:
        owner = Owner()
        f = FakeFactory(spares=1)
        assert f.spawn(CFG, owner) is f.last and f.spares_taken == ["m"] and f.spawns == []
        f.spawn(ModelConfig(id="c", path="/c", worker_command=("w",)), owner)  # never a spare: its own command
        f.spawn(CFG, owner)  # the pool is empty
        assert f.spawns == ["c", "m"] and len(f.workers) == 3
        f.fail_next_spawn(OSError("no fork"))
        with pytest.raises(OSError):
            f.spawn(CFG, owner)
        assert len(f.workers) == 3

        record = WorkerRecord(99, 5.0, "t", "r1", "ipc://unused", 1)
        f.next_adoption(present=False)
        assert f.adopt(record, CFG, owner) is None
        w = f.adopt(record, CFG, owner)
        assert w is not None and w.process.pid == 99 and w.process.start_time == 5.0
        assert await f.prove(w, record, "r1") is None and isinstance(w.told[-1], Adopt)
        f.next_adoption(why="not an adoption hello")
        assert await f.prove(w, record, "r1") == "not an adoption hello"
        assert "no longer wanted" in (await f.prove(w, record, "r2") or "")
        assert f.adoptions == [99, 99] and [why is None for _, why in f.proofs] == [True, False, False]
        f.end_orphan(record, CFG, "revision gone")
        assert f.orphans_ended == [(99, "revision gone")]

    _run(scenario())
