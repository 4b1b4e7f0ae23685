"""The peer link (docs/distributed.md): what a group's owning supervisor asks of a member supervisor
over its CURVE endpoint (a client key with role "peer"), and what the member reports back.

RankPlace asks the member to run one rank of a group. Its answer is a stream on the same request id:
RankReports ("placed", "hello", "ready", "beat" once per heartbeat interval, then "exit"), or an
Error when it refuses (admission, model_roots, versions). The stream is also the link's liveness:
no report for link_timeout_s and the owner counts the host as lost (PEER_UNAVAILABLE). RankSend
carries a request to the rank; RankEnd ends it (SIGKILL: its group is over)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from protocol.wirebase import Message


@dataclass
class RankPlace(Message):
    TAG: ClassVar[str] = "rank_place"
    request_id: str
    group: str  # the group's run: model id and a nonce of the owner's, unique per start
    model: str
    revision: str
    path: str  # the snapshot, the same path on every host; inside the member's model_roots
    rank: int
    size: int
    backend: str
    parallel: str
    env: dict  # MLX's variables for this rank (MLX_RANK, MLX_WORLD_SIZE; jaccl's)
    hostfile: list  # the ring's hostfile: one ["ip:port"] per rank (the member writes its own copy)
    init: dict  # the worker's Init fields the owner decides (heartbeat, batch, context, memory limit)
    versions: dict = field(default_factory=dict)  # the owner's mlx and mlx-lm: the member's must match


@dataclass
class RankReport(Message):
    TAG: ClassVar[str] = "rank_report"
    request_id: str
    kind: str  # placed | hello | ready | beat | exit
    pid: Optional[int] = None
    progress: int = 0
    phase: str = ""
    memory: dict = field(default_factory=dict)
    load_s: float = 0.0
    # exit: the member's verdict on its rank's death (code, cause, signal, exit_code), its last lines
    code: Optional[str] = None
    cause: Optional[str] = None
    details: dict = field(default_factory=dict)
    stderr_tail: list = field(default_factory=list)


@dataclass
class RankSend(Message):
    TAG: ClassVar[str] = "rank_send"
    request_id: str
    group: str
    request: dict  # a GenerateRequest's fields


@dataclass
class RankEnd(Message):
    TAG: ClassVar[str] = "rank_end"
    request_id: str
    group: str
    reason: str = ""


REQUESTS = (RankPlace, RankSend, RankEnd)
REPLIES = (RankReport,)
