"""A group's decisions (supervisor.workers.group.RankGroup), in-process: a real RankGroup over
FakeWorker ranks (tests/fakeworker.py), so what a rank's death, a lost peer or a cache clear does to
the group is checked in milliseconds. tests/test_groups.py proves the same boundary with real ranks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from protocol import errors as E
from protocol.messages import Cancel, ClearPrefixCache, GenerateRequest, Init, Message, Shutdown
from supervisor import config as cfg_mod
from supervisor.config import SupervisorSettings
from supervisor.workers import group as group_mod
from supervisor.workers.classify import PEER_LOST
from supervisor.workers.group import RankGroup
from tests.fakeworker import FakeHost, FakeWorker

pytestmark = pytest.mark.timeout(20)

SUP = SupervisorSettings(handshake_timeout_s=0.5, load_timeout_s=0.5)


class Owner:
    def __init__(self) -> None:
        self.results: list[Message] = []
        self.exits: list[Any] = []
        self.exited = asyncio.Event()

    def on_worker_result(self, worker: Any, msg: Message) -> None:
        self.results.append(msg)

    def on_worker_exit(self, worker: Any, rc: int | None) -> None:
        self.exits.append(worker)
        self.exited.set()


def _group(tmp_path: Path, size: int = 3) -> tuple[RankGroup, Owner, list[FakeWorker]]:
    """A group of `size` local ranks, each an in-process FakeWorker (what spawn() would start)."""
    hosts = ", ".join(['"local"'] * size)
    config = cfg_mod.parse(f'[[models]]\nid = "big"\npath = "{tmp_path}"\ngroup = {{hosts = [{hosts}]}}\n')
    owner = Owner()
    group = RankGroup(config.models[0], FakeHost(config, tmp_path), owner)
    ranks = []
    for rank in group.ranks:
        rank.handle = FakeWorker(group.cfg, group, pid=100 + rank.index)
        ranks.append(rank.handle)
    return group, owner, ranks


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_group_comes_up_when_every_rank_has_and_each_rank_gets_its_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        group, _, ranks = _group(tmp_path)
        init = Init("big", "r", str(tmp_path), 1.0, 60.0)
        await group.greet(init, SUP)
        assert [r.told[0].group["rank"] for r in ranks] == [0, 1, 2]
        assert all(r.told[0].orphan_grace_s == 0.0 for r in ranks)
        await group.load(SUP)
        assert group.loaded is ranks[0].loaded and group.handshake.loaded is ranks[0].loaded

    _run(scenario())


def test_a_prefix_cache_clear_and_a_control_message_reach_every_rank(tmp_path: Path) -> None:
    async def scenario() -> None:
        group, _, ranks = _group(tmp_path)
        assert group.send(ClearPrefixCache())
        group.tell(Shutdown("stop"))
        assert all(r.sent == [ClearPrefixCache()] and r.told == [Shutdown("stop")] for r in ranks)
        req = GenerateRequest("q", "big", prompt="x")
        assert group.send(req) and group.send(Cancel("q"))
        assert [len(r.sent) for r in ranks] == [3, 2, 2]  # a cancel is rank 0's: it decides for all

    _run(scenario())


def test_a_ranks_death_is_the_groups_one_death_naming_the_rank_and_its_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        group, owner, ranks = _group(tmp_path)
        ranks[1].die(E.ErrorCode.WORKER_OOM, "bad_alloc", rc=3)
        assert owner.exits == [group]  # once, for the whole group
        assert not any(r.process.alive for r in ranks) and ranks[0].death is None  # ended with it
        assert group.process.pid == 101 and group.failed is group.ranks[1]
        err = group.death.error() if group.death else None
        assert isinstance(err, E.WorkerOOM)
        assert err.message == "rank 1 on local: worker pid 101 died (exit code 3): bad_alloc"
        assert (err.details["rank"], err.details["host"], err.details["worker_pid"]) == (1, "local", 101)
        with pytest.raises(E.WorkerOOM):
            await group.handshake.ready
        assert group.send(GenerateRequest("q", "big", prompt="x")) is False

    _run(scenario())


def test_a_rank_that_only_lost_a_peer_waits_for_the_peers_own_death(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(group_mod, "PEER_LOST_GRACE_S", 0.05)

    async def scenario() -> tuple[RankGroup, Owner]:
        group, owner, ranks = _group(tmp_path)
        ranks[0].die(E.ErrorCode.WORKER_CRASHED, PEER_LOST, rc=1)
        assert owner.exits == []  # not yet: the peer's own death may come
        ranks[2].die(E.ErrorCode.WORKER_CRASHED, "killed by SIGKILL")
        assert owner.exits == [group] and group.failed is group.ranks[2]
        lone, lone_owner, lone_ranks = _group(tmp_path / "b")
        lone_ranks[1].die(E.ErrorCode.WORKER_CRASHED, PEER_LOST, rc=1)
        await asyncio.wait_for(lone_owner.exited.wait(), 5)  # after the (shortened) grace: nobody else died
        assert lone_owner.exits == [lone] and lone.death is not None and lone.death.cause == PEER_LOST
        return group, owner

    group, owner = _run(scenario())
    assert len(owner.exits) == 1


def test_a_closed_groups_exits_are_no_death(tmp_path: Path) -> None:
    async def scenario() -> None:
        group, owner, ranks = _group(tmp_path)
        await group.close("unload", 1.0)
        await group.close("again", 1.0)
        assert all(r.closes == ["unload", "again"] for r in ranks)
        assert group.death is None and owner.exits == []

    _run(scenario())
