"""The admin half of the client wire: one request struct per operation, a typed reply where the
answer has a fixed shape, and the legacy `AdminRequest(op=...)` that older clients still send."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from protocol.errors import BadRequest
from protocol.wirebase import Message


@dataclass
class AdminOp(Message):
    """Base of the typed admin requests. `OP` is the operation's name: what `AdminRequest.op` said
    for it, what role checks and logs name, and what an older client still sends."""

    OP: ClassVar[str] = ""
    request_id: str

    def subject(self) -> Optional[str]:
        """The model the operation concerns, for logs (None: the supervisor as a whole)."""
        return getattr(self, "model", None)


@dataclass
class ReloadRequest(AdminOp):
    """Re-read the config file, like SIGHUP."""

    TAG: ClassVar[str] = "reload"
    OP = "reload"


@dataclass
class ReleaseRequest(AdminOp):
    """Lift a quarantine and start the model again on its configured revision."""

    TAG: ClassVar[str] = "release"
    OP = "release"
    model: str


@dataclass
class RollbackRequest(AdminOp):
    """Run `revision` (None: the last-known-good one)."""

    TAG: ClassVar[str] = "rollback"
    OP = "rollback"
    model: str
    revision: Optional[str] = None


@dataclass
class SwapRequest(AdminOp):
    """`target` takes over `model`'s requests."""

    TAG: ClassVar[str] = "swap"
    OP = "swap"
    model: str
    target: str


@dataclass
class ProbeRequest(AdminOp):
    """Admit, load and canary the snapshot directory at `path` in a throwaway worker."""

    TAG: ClassVar[str] = "probe"
    OP = "probe"
    path: str


@dataclass
class RepairRequest(AdminOp):
    TAG: ClassVar[str] = "repair"
    OP = "repair"
    model: str


@dataclass
class VerifyRequest(AdminOp):
    TAG: ClassVar[str] = "verify"
    OP = "verify"
    model: str


@dataclass
class CompatRequest(AdminOp):
    TAG: ClassVar[str] = "compat"
    OP = "compat"


@dataclass
class MetricsRequest(AdminOp):
    TAG: ClassVar[str] = "metrics"
    OP = "metrics"


@dataclass
class CacheClearRequest(AdminOp):
    """Forget `model`'s prefix cache (None: every model's)."""

    TAG: ClassVar[str] = "cache_clear"
    OP: ClassVar[str] = "cache-clear"
    model: Optional[str] = None


@dataclass
class AdminReply(Message):
    """Base of the typed admin replies: `detail()` is what an `Ack` to an older client carries."""

    request_id: str

    def detail(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "request_id"}


@dataclass
class MetricsReply(AdminReply):
    TAG: ClassVar[str] = "metrics_reply"
    text: str  # the Prometheus text exposition


@dataclass
class VerifyReply(AdminReply):
    TAG: ClassVar[str] = "verify_reply"
    path: str
    findings: list[dict]  # [{code, file, message}]; empty: the snapshot passed


@dataclass
class CompatReply(AdminReply):
    TAG: ClassVar[str] = "compat_reply"
    backend: str  # this supervisor's stack
    rows: list[dict]  # [{model, backend, outcome, evidence, ...}]


@dataclass
class CacheClearReply(AdminReply):
    TAG: ClassVar[str] = "cache_clear_reply"
    models: list[str]
    files: int
    bytes: int


@dataclass
class AdminRequest(Message):
    """The legacy admin message (older lmxctl, the LMX server): an op name and the union of every
    op's arguments. Still decoded and served; `typed()` is the request it stands for."""

    TAG: ClassVar[str] = "admin"
    request_id: str
    op: str
    model: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None  # probe: a snapshot directory
    target: Optional[str] = None  # swap: the model that takes over `model`'s requests

    def typed(self) -> AdminOp:
        """The typed request for this op. A required argument left out becomes "" so the handler
        refuses it exactly as it always has (an unknown model "", "probe needs a path")."""
        cls = BY_OP.get(self.op)
        if cls is None:
            raise BadRequest(f"unknown admin op {self.op[:32]!r}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name != "request_id":
                value = getattr(self, f.name)
                required = f.default is dataclasses.MISSING
                kwargs[f.name] = "" if value is None and required else value
        return cls(self.request_id, **kwargs)


REQUESTS = (ReloadRequest, ReleaseRequest, RollbackRequest, SwapRequest, ProbeRequest, RepairRequest,
            VerifyRequest, CompatRequest, MetricsRequest, CacheClearRequest)
REPLIES = (MetricsReply, VerifyReply, CompatReply, CacheClearReply)
BY_OP: dict[str, type[AdminOp]] = {c.OP: c for c in REQUESTS}


def legacy(req: AdminOp) -> AdminRequest:
    """The `AdminRequest` an older supervisor understands for `req` (what the client falls back to)."""
    fields = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name != "request_id"}
    return AdminRequest(req.request_id, req.OP, **fields)
