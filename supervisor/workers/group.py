"""A group: one model served by several ranks (worker processes on mx.distributed, docs/distributed.md),
owned as one unit. To its model's runtime it is one worker: one handshake (every rank's hello, then
every rank's ready), one process to report (rank 0's, or the rank that failed), one death. The first
rank to die, or to be judged hung or over its memory, is the group's death: every other rank is
SIGKILLed at once and the error names the rank and its host. Requests go to every rank, in the same
order (the ranks run them in lockstep, worker.group); cancels go to rank 0, which decides for all."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
from pathlib import Path
from typing import Any

from protocol import errors as E
from protocol.messages import Cancel, ClearPrefixCache, CountTokens, GenerateRequest, Init, Message
from supervisor import logs, topology
from supervisor.admission import compat
from supervisor.config import ModelConfig, SupervisorSettings
from supervisor.workers import groupfiles
from supervisor.workers.classify import PEER_LOST
from supervisor.workers.handle import WorkerHandle
from supervisor.workers.remoterank import RemoteRank, place_message
from supervisor.workers.worker import Death, GroupMember, Handshake, Host, Owner, wait_for


# A rank that died because a peer went away waits this long for that peer's own death (or its
# host's loss) to be the group's cause: the supervisor reaps a local rank within milliseconds.
PEER_LOST_GRACE_S = 1.0


def free_ports(host: str, n: int) -> list[int]:
    """n TCP ports free on `host` now (the ranks bind them a moment later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclasses.dataclass
class Rank:
    index: int
    host: str
    address: str  # "ip:port" its ring listens on
    handle: GroupMember | None = None  # a WorkerHandle (a local rank) or a RemoteRank, once spawned


class RankGroup:
    """A Worker (supervisor.workers.worker) that is several ranks, here and on peers."""

    def __init__(self, cfg: ModelConfig, host: Host, owner: Owner) -> None:
        assert cfg.group is not None
        self.cfg = cfg
        self.spec = cfg.group
        self._host = host
        self._owner = owner
        self.log = logs.get(model=cfg.id)
        sup = host.config.supervisor
        here = topology.local_data_address(sup.data_address, sup.listen)
        self._peers = {p.name: p for p in host.config.peers}
        hosts = [here if h == topology.LOCAL else self._peers[h].data_host for h in self.spec.hosts]
        if self.spec.ring_port:
            ports = [self.spec.ring_port + i for i in range(self.spec.size)]
        else:
            ports = free_ports(here, self.spec.size)
        self.ranks = [Rank(i, h, f"{addr}:{port}") for i, (h, addr, port) in enumerate(zip(self.spec.hosts, hosts, ports))]
        self.stopping = False
        self.death: Death | None = None
        self.failed: Rank | None = None
        self._grace: asyncio.TimerHandle | None = None  # a rank lost a peer: waiting for the peer's death
        self._hostfile: Path = groupfiles.write(host.state_dir, f"{cfg.id}.hostfile.json", self.hostfile_rows)
        if self.spec.backend == "jaccl":  # rank 0 runs the coordinator, on its host's data address
            port = self.spec.jaccl_coordinator_port or free_ports(here, 1)[0]
            self._coordinator = f"{here}:{port}"
        self.handshake = Handshake()

    def _members(self) -> list[GroupMember]:
        return [r.handle for r in self.ranks if r.handle is not None]

    def _handle(self, rank: Rank) -> GroupMember:
        assert rank.handle is not None, "a rank is read only once the group has spawned"
        return rank.handle

    # --- start ---------------------------------------------------------------------------------

    @property
    def hostfile_rows(self) -> list[list[str]]:
        """The ring's hostfile: one ["ip:port"] per rank."""
        return [[r.address] for r in self.ranks]

    def rank_env(self, rank: Rank) -> dict[str, str]:
        """MLX's own variables for this rank (what mlx.launch would set)."""
        env = {"MLX_RANK": str(rank.index), "MLX_WORLD_SIZE": str(self.spec.size)}
        if self.spec.backend == "ring":
            env["MLX_HOSTFILE"] = str(self._hostfile)
        else:
            env["MLX_IBV_DEVICES"] = self.spec.jaccl_devices_file
            env["MLX_JACCL_COORDINATOR"] = self._coordinator
        return env

    def spawn(self, sup: SupervisorSettings, init: Init) -> None:
        """Every rank at once: local ones as workers here, the others placed on their peers."""
        group_id = f"{self.cfg.id}-{secrets.token_hex(4)}"
        for rank in self.ranks:
            env = self.rank_env(rank)
            if rank.host == topology.LOCAL:
                rank.handle = WorkerHandle.spawn(self.cfg, self._host, self, env=env)
            else:
                env.pop("MLX_HOSTFILE", None)  # the member writes its own copy
                place = place_message(group_id, self.cfg, rank.index, self.spec.size, self.spec, env,
                                      self.hostfile_rows, init, compat.versions())
                rank.handle = RemoteRank(self._peers[rank.host], place, self, sup)
            rank.handle.watch(sup)
        self.log.info("group.spawned", group=group_id, ranks=[
            {"rank": r.index, "host": r.host, "address": r.address, "worker_pid": self._handle(r).process.pid}
            for r in self.ranks])

    async def greet(self, init: Init, sup: SupervisorSettings) -> None:
        """Every rank's hello, then Init (with its place in the group) to the local ones (a peer
        gives its own theirs), then every rank's ready. A rank's death on the way fails the awaited
        step with the group's error."""
        try:
            await wait_for(self._all("hello"), sup.handshake_timeout_s,
                           E.LoadTimeout(f"not every rank said hello within handshake_timeout_s={sup.handshake_timeout_s}"))
            for rank in self.ranks:
                if rank.host != topology.LOCAL:
                    continue
                group = {"rank": rank.index, "size": self.spec.size, "backend": self.spec.backend,
                         "parallel": self.spec.parallel}
                # orphan_grace_s 0: a rank whose supervisor is gone ends at once (the group is over)
                self._handle(rank).tell(dataclasses.replace(init, group=group, orphan_grace_s=0.0))
            self.handshake.said_hello(None)
        except E.LmxError as exc:
            self.handshake.said_hello(exc)
            raise

    async def load(self, sup: SupervisorSettings) -> None:
        try:
            await wait_for(self._all("ready"), sup.load_timeout_s,
                           E.LoadTimeout(f"not every rank was ready within load_timeout_s={sup.load_timeout_s}"))
            self.handshake.said_ready(self._handle(self.ranks[0]).loaded)
        except E.LmxError as exc:
            self.handshake.said_ready(exc)
            raise

    async def _all(self, which: str) -> None:
        """Every rank's `which` future; the group's error as soon as one rank fails (its death, or
        an error it sent, named with its rank and host)."""
        waits = {}
        for r in self.ranks:
            fut = getattr(self._handle(r).handshake, which)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # the others', once one failed
            waits[asyncio.ensure_future(asyncio.shield(fut))] = r
        try:
            for done in asyncio.as_completed(list(waits)):
                try:
                    await done
                except E.LmxError as exc:
                    if self.death is None:
                        rank = next(r for t, r in waits.items() if t.done() and t.exception() is exc)
                        exc.details.update(rank=rank.index, host=rank.host)
                        raise
                if self.death is not None:
                    raise self.death.error()
        finally:
            for t in waits:
                t.cancel()

    # --- what the runtime reads of its "worker" -----------------------------------------------

    @property
    def process(self) -> Any:
        """The process a status or a crash record names: the rank that failed, else rank 0's."""
        rank = self.failed or self.ranks[0]
        return self._handle(rank).process

    @property
    def loaded(self) -> Any:
        return self._handle(self.ranks[0]).loaded

    @property
    def memory(self) -> dict:
        """This host's: the failed rank's if it ran here, else rank 0's (what the ledger and the
        crash record read)."""
        rank = self.failed if self.failed is not None and self.failed.host == topology.LOCAL else self.ranks[0]
        return self._handle(rank).memory

    @property
    def phase(self) -> str:
        return self._handle(self.ranks[0]).phase

    @property
    def progress(self) -> int:
        return self._handle(self.ranks[0]).progress

    @property
    def cache(self) -> dict:
        return {}  # a group's ranks keep no prefix cache (worker.group)

    @property
    def available_at_beat(self) -> int | None:
        return self._handle(self.ranks[0]).available_at_beat

    def status(self) -> list[dict[str, Any]]:
        """Each rank, for lmxctl status."""
        out = []
        for r in self.ranks:
            h = r.handle
            alive = h is not None and h.process.alive
            out.append({"rank": r.index, "host": r.host, "address": r.address,
                        "pid": h.process.pid if h else None, "state": h.phase if alive else "exited",
                        "memory": dict(h.memory) if h else {}})
        return out

    # --- the wire ------------------------------------------------------------------------------

    def send(self, msg: Message) -> bool:
        """A request to every rank (in one order: the ranks run it together), and so a prefix-cache
        clear (the barrier goes the way the requests go, on every rank); a cancel to rank 0."""
        if self.death is not None or self.stopping:
            return False
        if isinstance(msg, (GenerateRequest, ClearPrefixCache)):
            return all([m.send(msg) for m in self._members()])
        if isinstance(msg, (Cancel, CountTokens)):  # a count is rank 0's alone: nothing runs together
            return self._handle(self.ranks[0]).send(msg)
        return False

    def knows(self, tag: str) -> bool:
        return self._handle(self.ranks[0]).knows(tag)

    def tell(self, msg: Message) -> None:
        """To every rank. Init is not told this way: each rank's differs (its place, in `greet`)."""
        for member in self._members():
            member.tell(msg)

    # --- the ranks' owner ----------------------------------------------------------------------

    def on_worker_result(self, handle: Any, msg: Message) -> None:
        if handle is self.ranks[0].handle:  # a follower's output would repeat rank 0's
            self._owner.on_worker_result(self, msg)

    def on_worker_exit(self, handle: Any, rc: int | None) -> None:
        """The first rank to die is the group's death, unless it only lost a peer (its collective
        broke because another rank died, or a host was lost): then that other rank's death, if it
        comes within PEER_LOST_GRACE_S, is the cause."""
        rank = next((r for r in self.ranks if r.handle is handle), None)
        if rank is None or self.stopping or self.death is not None or handle.death is None:
            return
        if handle.death.cause == PEER_LOST:
            if self._grace is None:
                self._grace = asyncio.get_running_loop().call_later(PEER_LOST_GRACE_S, self._conclude, rank, rc)
            return
        if self._grace is not None:
            self._grace.cancel()
        self._conclude(rank, rc)

    def _conclude(self, rank: Rank, rc: int | None) -> None:
        if self.death is not None or self.stopping:
            return
        handle = self._handle(rank)
        assert handle.death is not None
        # The rank's own verdict, named as the group's: its message, whatever the rank's kind, is
        # "rank R on HOST: worker pid P died (...): cause", and its details carry rank and host.
        verdict = dataclasses.replace(handle.death, details={**handle.death.details, "rank": rank.index,
                                                             "host": rank.host})
        self.death = Death.of(verdict, handle.process.pid, where=f"rank {rank.index} on {rank.host}")
        self.failed = rank
        self.log.error("group.failed", rank=rank.index, host=rank.host, code=self.death.code.code,
                       cause=self.death.cause, worker_pid=handle.process.pid)
        for other in self._members():
            if other is not handle:
                other.end_with_group()
        self.handshake.fail(self.death.error())
        self._owner.on_worker_exit(self, rc)

    async def close(self, reason: str, timeout_s: float) -> None:
        """Every rank, at once: the ladder for each (a group cannot serve with one rank gone)."""
        self.stopping = True
        if self._grace is not None:
            self._grace.cancel()
        await asyncio.gather(*(m.close(reason, timeout_s) for m in self._members()))
