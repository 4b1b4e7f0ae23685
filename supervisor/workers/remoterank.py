"""The owner's side of the peer link: one rank of a group that a peer supervisor runs (its side is
supervisor.workers.placed). To its group it looks like a WorkerHandle: hello and ready futures, the
figures of its last report, `send`, `close`, and one death. Its death is the member's verdict on the
rank (WORKER_CRASHED, WORKER_HUNG, WORKER_OOM, LOAD_FAILED), or PEER_UNAVAILABLE when the member
refused the rank, its connection was lost, or its reports stopped for link_timeout_s."""

from __future__ import annotations

import asyncio
import collections
import uuid
from dataclasses import dataclass
from typing import Any

from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.messages import Error, GenerateRequest, Init, Message
from protocol.peer import RankEnd, RankPlace, RankReport, RankSend
from supervisor import logs
from supervisor.config import SupervisorSettings
from supervisor.topology import PeerConfig
from supervisor.workers.classify import Verdict


@dataclass
class Loaded:
    load_s: float


class RemoteProcess:
    """What a status or a crash record reads of a process: the member's pid and last lines."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self.alive = True


class RemoteRank:
    def __init__(self, peer: PeerConfig, place: RankPlace, owner: Any, sup: SupervisorSettings) -> None:
        self.peer = peer
        self._place = place
        self._owner = owner
        self._sup = sup
        self.process = RemoteProcess()
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()
        self.progress, self.phase, self.memory = 0, "starting", {}
        self.stopping = False
        self.death: Verdict | None = None
        self.log = logs.get(model=place.model)
        self._client = SupervisorClient(peer.endpoint, client_cert=peer.client_cert,
                                        server_key_file=peer.server_key_file, timeout_s=sup.link_timeout_s,
                                        connect_timeout_s=sup.link_timeout_s)
        self._task = loop.create_task(self._run(), name=f"rank-{place.group}-{place.rank}")

    @property
    def loaded(self) -> Any:
        return self.ready.result() if self.ready.done() and not self.ready.exception() else None

    # --- the link ------------------------------------------------------------------------------

    async def _run(self) -> None:
        timeout = self._sup.link_timeout_s
        try:
            q = await self._client._begin(self._place)
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        msg = await q.get()
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
        except E.LmxError as exc:  # could not connect, or the peer refused our key
            self._die(E.ErrorCode.PEER_UNAVAILABLE, f"peer {self.peer.name!r}: {exc.message}")
        except asyncio.CancelledError:
            raise

    def _on_report(self, r: RankReport) -> bool:
        """True once the rank is over."""
        if r.pid is not None:
            self.process.pid = r.pid
        if r.memory:
            self.memory = r.memory
        if r.kind == "hello" and not self.hello.done():
            self.hello.set_result(r)
        elif r.kind == "ready" and not self.ready.done():
            self.phase = "idle"
            self.ready.set_result(Loaded(r.load_s))
        elif r.kind == "beat":
            self.progress, self.phase = r.progress, r.phase
        elif r.kind == "exit":
            self.process.stderr_tail.extend(r.stderr_tail)
            self._die(E.ErrorCode.parse(r.code or "WORKER_CRASHED"), r.cause or "exited", r.details)
            return True
        return False

    def _die(self, code: E.ErrorCode, cause: str, details: dict | None = None) -> None:
        self.process.alive = False
        if self.stopping or self.death is not None:
            return
        self.death = Verdict(code, cause, details={"signal": None, "exit_code": None, **(details or {})})
        err = self.death_error()
        for fut in (self.hello, self.ready):
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        self._owner.on_worker_exit(self, None)

    def death_error(self) -> E.LmxError:
        v = self.death
        assert v is not None
        return E.error_class(v.code)(f"{v.cause}", worker_pid=self.process.pid, cause=v.cause, **v.details)

    # --- what the group asks -------------------------------------------------------------------

    def watch(self, sup: SupervisorSettings) -> None:
        pass  # the member watches its rank; the link's silence is watched in _run

    def send(self, msg: Message) -> bool:
        if not isinstance(msg, GenerateRequest) or self.death is not None:
            return False
        self._fire(RankSend(uuid.uuid4().hex, self._place.group, msg.to_wire()))
        return True

    def tell(self, msg: Message) -> None:
        pass  # its Init went with the place request; its stop is RankEnd

    def _fire(self, msg: Message) -> None:
        async def go() -> None:
            try:
                await self._client._send(msg)
            except E.LmxError as exc:
                self.log.warning("peer.send_failed", peer=self.peer.name, type=msg.TAG, error=exc.message)

        asyncio.get_running_loop().create_task(go())

    def end_with_group(self) -> None:
        self.stopping = True
        self._fire(RankEnd(uuid.uuid4().hex, self._place.group, "its group failed"))

    async def close(self, reason: str, timeout_s: float) -> None:
        """RankEnd (the member SIGKILLs it), then the link is dropped: the member ends the rank on
        its own too, when its next report finds the owner's connection gone."""
        if not self.stopping:
            self.stopping = True
            try:
                await self._client._call(RankEnd(uuid.uuid4().hex, self._place.group, reason),
                                         min(timeout_s, self._sup.link_timeout_s))
            except E.LmxError as exc:
                self.log.warning("peer.end_failed", peer=self.peer.name, error=exc.message)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.close()
        self.process.alive = False


def place_message(group_id: str, cfg: Any, rank: int, size: int, spec: Any, env: dict, hostfile: list,
                  init: Init, versions: dict) -> RankPlace:
    fields = {k: getattr(init, k) for k in ("memory_limit_bytes", "max_batch_size", "prefill_step_size",
                                            "stream_interval_s", "context_tokens")}
    return RankPlace(uuid.uuid4().hex, group_id, cfg.id, cfg.revision, cfg.path, rank, size, spec.backend,
                     spec.parallel, env, hostfile, fields, versions)

