"""The peer link (docs/distributed.md): what a group's owning supervisor asks of a member supervisor
over its CURVE endpoint (a client key with role "peer"), and what the member reports back.

RankPlace asks the member to run one rank of a group; it nests the rank's Init (the owner decides
only RANK_INIT_FIELDS of it). Its answer is a stream on the same request id, one message type per
report: RankPlaced (spawned), RankHello, RankReady, RankBeat (once per heartbeat interval, from
placement on), then RankExit; or an Error when the member refuses (admission, model_roots,
versions). The stream is also the link's liveness: no report for link_timeout_s and the owner
counts the host as lost (PEER_UNAVAILABLE). RankSend carries a GenerateRequest to the rank; RankEnd
ends it (SIGKILL: its group is over).

These shapes are not kept readable across versions (no `added()` policy, unlike the client's and
the worker's messages): the two ends of a peer link must run the same version of lmx-supervisor,
as every host of a group must anyway (their mlx and mlx-lm must match, RankPlace.versions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from protocol.wirebase import Message
from protocol.work import GenerateRequest, Init

# The Init fields an owner decides for its rank, all numbers. Every other field of RankPlace.init
# is at its default, or the place's own model, revision and path: the member sets those itself.
RANK_INIT_FIELDS = ("memory_limit_bytes", "max_batch_size", "prefill_step_size", "stream_interval_s",
                    "context_tokens")


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
    init: Init  # the rank's Init: the owner's RANK_INIT_FIELDS (heartbeat, group, paths: the member's)
    versions: dict = field(default_factory=dict)  # the owner's mlx and mlx-lm: the member's must match


@dataclass
class RankReport(Message):
    """Base of the member's reports on a RankPlace's stream; `kind` names which."""

    kind: ClassVar[str] = ""
    request_id: str
    pid: Optional[int] = None  # the rank's worker on the member


@dataclass
class RankPlaced(RankReport):
    TAG: ClassVar[str] = "rank_placed"
    kind: ClassVar[str] = "placed"


@dataclass
class RankHello(RankReport):
    TAG: ClassVar[str] = "rank_hello"
    kind: ClassVar[str] = "hello"


@dataclass
class RankReady(RankReport):
    TAG: ClassVar[str] = "rank_ready"
    kind: ClassVar[str] = "ready"
    load_s: float = 0.0
    memory: dict = field(default_factory=dict)


@dataclass
class RankBeat(RankReport):
    """The link's pulse, with the rank's figures as its worker's heartbeat has them."""

    TAG: ClassVar[str] = "rank_beat"
    kind: ClassVar[str] = "beat"
    progress: int = 0
    phase: str = ""  # a protocol.phase.Phase value
    memory: dict = field(default_factory=dict)


@dataclass
class RankExit(RankReport):
    """The member's verdict on its rank's death (or on an error that ended it) and its last lines."""

    TAG: ClassVar[str] = "rank_exit"
    kind: ClassVar[str] = "exit"
    code: str = "WORKER_CRASHED"
    cause: str = "exited"
    details: dict = field(default_factory=dict)  # signal, exit_code and what the verdict adds
    stderr_tail: list[str] = field(default_factory=list)
    memory: dict = field(default_factory=dict)


@dataclass
class RankSend(Message):
    TAG: ClassVar[str] = "rank_send"
    request_id: str
    group: str
    request: GenerateRequest


@dataclass
class RankEnd(Message):
    TAG: ClassVar[str] = "rank_end"
    request_id: str
    group: str
    reason: str = ""


REQUESTS = (RankPlace, RankSend, RankEnd)
REPLIES = (RankPlaced, RankHello, RankReady, RankBeat, RankExit)
