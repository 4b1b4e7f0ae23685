"""The member's side of the peer link (protocol.peer, docs/distributed.md): ranks this supervisor
runs for groups that peer supervisors own. A rank here is a worker like any other (its own watch:
heartbeats, stalls, memory), placed only inside this supervisor's model_roots, on a snapshot that
passes this host's own integrity check, by a peer whose mlx and mlx-lm match ours. Everything it
does is reported on the RankPlace's stream; the owner decides what it means for the group. When the
owner cannot be reached any more (its connection gone), the rank is ended: its group is over."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable, Protocol

from protocol import errors as E
from protocol.messages import Message
from protocol.peer import (
    RankBeat, RankEnd, RankExit, RankHello, RankPlace, RankPlaced, RankReady, RankReport, RankSend,
)
from supervisor import logs
from supervisor.admission import admit, compat
from supervisor.admission.memory import MemoryLedger
from supervisor.config import ModelConfig
from supervisor.persistence.store import Store
from supervisor.workers import groupfiles, remoteplace
from supervisor.workers.handle import WorkerHandle
from supervisor.workers.worker import Host

Report = Callable[[Message], "str | None"]  # ControlServer.send for the owner's connection


class MemberHost(Host, Protocol):
    """What placing ranks needs of this supervisor beyond a worker's Host (supervisor.services.
    Services has it): the store the integrity check reads, the ledger that holds a rank's memory."""

    @property
    def store(self) -> Store: ...

    @property
    def ledger(self) -> MemoryLedger: ...


class PlacedRank:
    """One rank run for a peer: the owner of its WorkerHandle, reporting on the place stream."""

    def __init__(self, msg: RankPlace, services: MemberHost, report: Report, env: dict[str, str], path: str,
                 devices: str | None = None) -> None:
        self.msg = msg
        self.env, self.path, self.devices = env, path, devices  # checked here (remoteplace), never the peer's word
        self._services = services
        self._report = report
        self.log = logs.get(model=msg.model)
        self.cfg = ModelConfig(id=msg.model, path=path, max_batch_size=1, prefix_cache_bytes=0,
                               memory_limit_bytes=msg.init.memory_limit_bytes)
        self.handle: WorkerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self.done = asyncio.get_running_loop().create_future()

    def say(self, report: RankReport) -> None:
        if self._report(report) == "gone" and not self.done.done():
            self.log.warning("peer.owner_gone", group=self.msg.group, rank=self.msg.rank)
            self.end("the owning supervisor is gone")

    def start(self) -> None:
        msg, sup = self.msg, self._services.config.supervisor
        env = dict(self.env)
        files = {"MLX_HOSTFILE": ("hostfile", msg.hostfile)} if msg.backend == "ring" else {}
        if self.devices is not None:
            files["MLX_IBV_DEVICES"] = ("devices", self.devices)
        for name, (kind, content) in files.items():
            # msg.group is one safe path component (remoteplace.check): the file stays in groups/.
            path = groupfiles.write(self._services.state_dir, f"{msg.group}.rank{msg.rank}.{kind}.json", content)
            self.done.add_done_callback(lambda _, p=path: p.unlink(missing_ok=True))
            env[name] = str(path)
        self.handle = WorkerHandle.spawn(self.cfg, self._services, self, env=env)
        self.handle.watch(sup)
        self.say(RankPlaced(msg.request_id, self.handle.process.pid))
        self.log.info("peer.rank_placed", group=msg.group, rank=msg.rank, worker_pid=self.handle.process.pid)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"placed-{msg.group}"),
                       loop.create_task(self._beat(), name=f"beat-{msg.group}")]

    async def _run(self) -> None:
        msg, sup, handle = self.msg, self._services.config.supervisor, self.handle
        assert handle is not None
        try:
            await handle.hello
            self.say(RankHello(msg.request_id, handle.process.pid))
            group = {"rank": msg.rank, "size": msg.size, "backend": msg.backend, "parallel": msg.parallel}
            # The owner's numbers (remoteplace checked that they are all it set); the rest is this
            # host's: the revision the worker echoes back is this host's hash of the section it runs.
            handle.tell(dataclasses.replace(msg.init, revision=self.cfg.revision, path=self.path,
                                            heartbeat_interval_s=sup.heartbeat_interval_s, orphan_grace_s=0.0,
                                            group=group))
            ready = await handle.ready
            self.say(RankReady(msg.request_id, handle.process.pid, ready.load_s, handle.memory))
        except E.LmxError as exc:
            if handle.death is None:  # an error it sent, not its death (which on_worker_exit reports)
                self.say(RankExit(msg.request_id, handle.process.pid, exc.code.code, exc.message))
                self.end(exc.message)

    async def _beat(self) -> None:
        """The link's pulse, from placement on (a rank may load for minutes), with the rank's figures."""
        handle, interval = self.handle, self._services.config.supervisor.heartbeat_interval_s
        assert handle is not None
        while not self.done.done():
            self.say(RankBeat(self.msg.request_id, handle.process.pid, handle.progress, handle.phase,
                              handle.memory))
            await asyncio.sleep(interval)

    def end(self, reason: str) -> None:
        if self.handle is not None and not self.done.done():
            self.handle.end_with_group()
            asyncio.get_running_loop().create_task(
                self.handle.close(reason, self._services.config.supervisor.stop_timeout_s))
        for task in self._tasks:
            task.cancel()
        if not self.done.done():
            self.done.set_result(reason)

    # --- the WorkerHandle's owner --------------------------------------------------------------

    def on_worker_result(self, handle: WorkerHandle, msg: Message) -> None:
        pass  # a follower's output repeats rank 0's, which the owner has

    def on_worker_exit(self, handle: WorkerHandle, rc: int | None) -> None:
        v = handle.death
        if v is not None:
            self.say(RankExit(self.msg.request_id, handle.process.pid, v.code.code, v.cause, dict(v.details),
                              list(handle.process.stderr_tail)[-20:], handle.memory))
        self.end("exited")


class PlacedRanks:
    def __init__(self, services: MemberHost) -> None:
        self._services = services
        self.ranks: dict[str, PlacedRank] = {}
        self.log = logs.get()

    async def place(self, msg: RankPlace, report: Report) -> None:
        """Refuse (raise the typed error) or start the rank; its reports go out on `report`."""
        sup = self._services.config.supervisor
        if not sup.model_roots:
            raise E.Unauthorized("this supervisor places no ranks for peers: it has no model_roots")
        env, path = remoteplace.check(msg, sup.model_roots)
        devices = remoteplace.devices(env)
        mine = compat.versions()
        if {k: msg.versions.get(k) for k in mine} != mine:
            raise E.PeerUnavailable(f"versions differ: the owner runs {msg.versions}, this host {mine}")
        if msg.group in self.ranks:
            raise E.BadRequest(f"group {msg.group} already has a rank here")
        cfg = ModelConfig(id=msg.model, path=path, prefix_cache_bytes=0,
                          context_tokens=msg.init.context_tokens or 4096)
        refusal = await admit.integrity(cfg, self._services.store, sup.model_roots)
        # This host's share of the model's memory, held in its ledger while the rank lives.
        key = f"{msg.model}:{msg.group}"
        refusal = refusal or await admit.reserve_memory(key, cfg, None, self._services.ledger, None, 1 / msg.size)
        if refusal is not None:
            raise refusal
        rank = PlacedRank(msg, self._services, report, env, path, devices)
        self.ranks[msg.group] = rank
        rank.done.add_done_callback(lambda _: (self.ranks.pop(msg.group, None), self._services.ledger.release(key)))
        rank.start()

    def send(self, msg: RankSend) -> None:
        rank = self.ranks.get(msg.group)
        if rank is not None and rank.handle is not None:
            rank.handle.send(msg.request)

    def end(self, msg: RankEnd) -> None:
        rank = self.ranks.get(msg.group)
        if rank is not None:
            rank.log.info("peer.rank_ended", group=msg.group, rank=rank.msg.rank, reason=msg.reason)
            rank.end(msg.reason or "ended by its owner")

    def close(self) -> None:
        for rank in list(self.ranks.values()):
            rank.end("supervisor stopping")

