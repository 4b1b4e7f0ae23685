"""The owner's side of the peer link: one rank of a group that a peer supervisor runs (its side is
supervisor.workers.placed), a GroupMember (supervisor.workers.worker) over a
protocol.connection.Connection to the member. Its handshake is settled by the member's reports, its
figures are those of its last report, and its death is the member's verdict on the rank
(WORKER_CRASHED, WORKER_HUNG, WORKER_OOM, LOAD_FAILED), or PEER_UNAVAILABLE when the member refused
the rank, its connection was lost, or its reports stopped for link_timeout_s."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from protocol import errors as E
from protocol import keys
from protocol.connection import Connection, ReplyStream, new_id
from protocol.messages import Error, GenerateRequest, Init, Message
from protocol.peer import (
    RANK_INIT_FIELDS, RankBeat, RankEnd, RankExit, RankHello, RankPlace, RankReady, RankReport, RankSend,
)
from protocol.phase import Phase
from supervisor import logs
from supervisor.config import SupervisorSettings
from supervisor.topology import PeerConfig
from supervisor.workers.classify import Verdict
from supervisor.workers.worker import Death, Handshake, Owner


class Loaded:
    """What stands for a Ready: the rank's load time, as its member reported it."""

    def __init__(self, load_s: float) -> None:
        self.load_s = load_s


class RemoteProcess:
    """What a status or a crash record reads of a process (a ProcessView): the member's pid and
    the rank's last lines. Its start time and token are the member's to check, never sent."""

    start_time: float | None = None
    token = ""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self.alive = True


class RemoteRank:
    def __init__(self, peer: PeerConfig, place: RankPlace, owner: Owner, sup: SupervisorSettings) -> None:
        self.peer = peer
        self._place = place
        self._owner = owner
        self._sup = sup
        self.process = RemoteProcess()
        self.handshake = Handshake()
        self.progress, self.memory = 0, {}
        self.phase: str = Phase.STARTING
        self.stopping = False
        self.death: Death | None = None
        self.log = logs.get(model=place.model)
        curve = keys.client_keys(None, None, None, peer.client_cert, peer.server_key_file)
        self._link = Connection(peer.endpoint, curve=curve, connect_timeout_s=sup.link_timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rank-{place.group}-{place.rank}")

    @property
    def loaded(self) -> Any:
        return self.handshake.loaded

    @property
    def cache(self) -> dict:
        return {}  # a group has no prefix cache (docs/distributed.md)

    @property
    def available_at_beat(self) -> None:
        return None  # the member's memory is the member's ledger's

    def knows(self, tag: str) -> bool:
        return False  # rank 0, always local, is the group's voice on what it serves

    def status(self) -> None:
        return None

    # --- the link ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with await self._link.stream(self._place) as reports:
                await self._follow(reports)
        except E.LmxError as exc:  # could not connect, or the peer refused our key
            self._die(E.ErrorCode.PEER_UNAVAILABLE, f"peer {self.peer.name!r}: {exc.message}")

    async def _follow(self, reports: ReplyStream) -> None:
        timeout = self._sup.link_timeout_s
        while True:
            try:
                async with asyncio.timeout(timeout):
                    msg = await reports.get()
            except TimeoutError:
                self._die(E.ErrorCode.PEER_UNAVAILABLE, f"no report from peer {self.peer.name!r} for {timeout}s "
                          "(link_timeout_s)")
                return
            if isinstance(msg, Error):
                code = E.ErrorCode.parse(msg.code)
                if code in (E.ErrorCode.SUPERVISOR_UNAVAILABLE, E.ErrorCode.INTERNAL):
                    code = E.ErrorCode.PEER_UNAVAILABLE
                self._die(code, f"peer {self.peer.name!r}: {msg.message}")
                return
            if isinstance(msg, RankReport) and self._on_report(msg):
                return

    def _on_report(self, r: RankReport) -> bool:
        """True once the rank is over."""
        if r.pid is not None:
            self.process.pid = r.pid
        match r:
            case RankHello():
                self.handshake.said_hello(r)
            case RankReady(load_s=load_s, memory=memory):
                self.memory = memory or self.memory
                self.phase = Phase.IDLE
                self.handshake.said_ready(Loaded(load_s))
            case RankBeat(progress=progress, phase=phase, memory=memory):
                self.progress, self.phase, self.memory = progress, phase, memory or self.memory
            case RankExit(code=code, cause=cause, details=details, stderr_tail=tail, memory=memory):
                self.memory = memory or self.memory
                self.process.stderr_tail.extend(tail)
                self._die(E.ErrorCode.parse(code), cause, details)
                return True
        return False

    def _die(self, code: E.ErrorCode, cause: str, details: dict | None = None) -> None:
        self.process.alive = False
        if self.stopping or self.death is not None:
            return
        verdict = Verdict(code, cause, details={"signal": None, "exit_code": None, **(details or {})})
        self.death = Death.of(verdict, self.process.pid, reported=True)
        self.handshake.fail(self.death.error())
        self._owner.on_worker_exit(self, None)

    # --- what the group asks -------------------------------------------------------------------

    async def greet(self, init: Init, sup: SupervisorSettings) -> None:
        """Its hello: its Init went with the place (RankPlace.init)."""
        await self._step(self.handshake.hello, sup.handshake_timeout_s, "hello", "handshake_timeout_s")

    async def load(self, sup: SupervisorSettings) -> None:
        await self._step(self.handshake.ready, sup.load_timeout_s, "ready", "load_timeout_s")

    async def _step(self, fut: asyncio.Future, timeout_s: float, what: str, setting: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise E.LoadTimeout(f"no {what} from peer {self.peer.name!r} within {setting}={timeout_s}") from None

    def watch(self, sup: SupervisorSettings) -> None:
        pass  # the member watches its rank; the link's silence is watched in _run

    def send(self, msg: Message) -> bool:
        if not isinstance(msg, GenerateRequest) or self.death is not None:
            return False
        self._fire(RankSend(new_id(), self._place.group, msg))
        return True

    def tell(self, msg: Message) -> None:
        pass  # its Init went with the place request, its stop is RankEnd, and a group has no prefix cache

    def _fire(self, msg: Message) -> None:
        async def go() -> None:
            try:
                await self._link.send(msg)
            except E.LmxError as exc:
                self.log.warning("peer.send_failed", peer=self.peer.name, type=msg.TAG, error=exc.message)

        asyncio.get_running_loop().create_task(go())

    def end_with_group(self) -> None:
        self.stopping = True
        self._fire(RankEnd(new_id(), self._place.group, "its group failed"))

    async def close(self, reason: str, timeout_s: float) -> None:
        """RankEnd (the member SIGKILLs it), then the link is dropped: the member ends the rank on
        its own too, when its next report finds the owner's connection gone."""
        if not self.stopping:
            self.stopping = True
            try:
                await self._link.call(RankEnd(new_id(), self._place.group, reason),
                                      min(timeout_s, self._sup.link_timeout_s))
            except E.LmxError as exc:
                self.log.warning("peer.end_failed", peer=self.peer.name, error=exc.message)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._link.close()
        self.process.alive = False


def place_message(group_id: str, cfg: Any, rank: int, size: int, spec: Any, env: dict, hostfile: list,
                  init: Init, versions: dict) -> RankPlace:
    """The RankPlace of one rank: its Init holds the owner's RANK_INIT_FIELDS of `init` and nothing
    else of this host's (no heartbeat, group or cache settings: the member decides those)."""
    mine = Init(cfg.id, cfg.revision, cfg.path, 0.0, 0.0, **{k: getattr(init, k) for k in RANK_INIT_FIELDS})
    return RankPlace(new_id(), group_id, cfg.id, cfg.revision, cfg.path, rank, size, spec.backend,
                     spec.parallel, env, hostfile, mine, versions)
