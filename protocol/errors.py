"""The error-code table (BRIEF §4) and the exception type per code that crosses process boundaries."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.Enum):
    """Stable error codes. Each value is (wire string, retryable, http_status)."""

    BAD_REQUEST = ("BAD_REQUEST", False, 400)
    UNAUTHORIZED = ("UNAUTHORIZED", False, 401)
    UNKNOWN_MODEL = ("UNKNOWN_MODEL", False, 404)
    SNAPSHOT_NOT_FOUND = ("SNAPSHOT_NOT_FOUND", False, 424)
    SNAPSHOT_INCOMPLETE = ("SNAPSHOT_INCOMPLETE", False, 424)
    SNAPSHOT_CORRUPT = ("SNAPSHOT_CORRUPT", False, 424)
    CONFIG_INVALID = ("CONFIG_INVALID", False, 424)
    UNSUPPORTED_ARCHITECTURE = ("UNSUPPORTED_ARCHITECTURE", False, 422)
    COMPAT_KNOWN_BAD = ("COMPAT_KNOWN_BAD", False, 422)
    INSUFFICIENT_MEMORY = ("INSUFFICIENT_MEMORY", True, 507)
    LOAD_FAILED = ("LOAD_FAILED", True, 503)
    LOAD_TIMEOUT = ("LOAD_TIMEOUT", True, 503)
    CANARY_FAILED = ("CANARY_FAILED", True, 503)
    CANARY_TIMEOUT = ("CANARY_TIMEOUT", True, 503)
    MODEL_NOT_READY = ("MODEL_NOT_READY", True, 503)
    MODEL_QUARANTINED = ("MODEL_QUARANTINED", False, 503)
    WORKER_CRASHED = ("WORKER_CRASHED", True, 502)
    WORKER_OOM = ("WORKER_OOM", True, 507)
    WORKER_HUNG = ("WORKER_HUNG", True, 504)
    # A group's member host was lost: its link to the owning supervisor was silent past the link
    # timeout, or its supervisor refused or could not place a rank (details: rank, host).
    PEER_UNAVAILABLE = ("PEER_UNAVAILABLE", True, 503)
    REQUEST_TIMEOUT = ("REQUEST_TIMEOUT", True, 504)
    CANCELLED = ("CANCELLED", False, 499)
    OVERLOADED = ("OVERLOADED", True, 429)
    SHUTTING_DOWN = ("SHUTTING_DOWN", True, 503)
    # Client-side only: the supervisor cannot be reached or went away mid-call. The
    # supervisor never sends it; the client raises it so a caller never hangs.
    SUPERVISOR_UNAVAILABLE = ("SUPERVISOR_UNAVAILABLE", True, 503)
    INTERNAL = ("INTERNAL", False, 500)

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def retryable(self) -> bool:
        return self.value[1]

    @property
    def http_status(self) -> int:
        return self.value[2]

    @classmethod
    def parse(cls, code: str) -> "ErrorCode":
        try:
            return cls[code]
        except KeyError:
            return cls.INTERNAL


class LmxError(Exception):
    """Base of every typed error; `details` carries code-specific fields (retry_after_s, signal...)."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code.code)
        self.message = message or self.code.code
        self.details = {k: v for k, v in details.items() if v is not None}

    @property
    def retryable(self) -> bool:
        return self.code.retryable

    @property
    def http_status(self) -> int:
        return self.code.http_status

    @property
    def retry_after_s(self) -> float | None:
        return self.details.get("retry_after_s")

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": self.code.code,
            "message": self.message,
            "retryable": self.retryable,
            "details": dict(self.details),
        }

    @staticmethod
    def from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> "LmxError":
        cls = _BY_CODE.get(ErrorCode.parse(code), InternalError)
        return cls(message, **(details or {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.code}: {self.message!r}, {self.details!r})"


def _make(name: str, code: ErrorCode) -> type[LmxError]:
    return type(name, (LmxError,), {"code": code, "__doc__": f"{code.code} (http {code.http_status})."})


BadRequest = _make("BadRequest", ErrorCode.BAD_REQUEST)
Unauthorized = _make("Unauthorized", ErrorCode.UNAUTHORIZED)
UnknownModel = _make("UnknownModel", ErrorCode.UNKNOWN_MODEL)
SnapshotNotFound = _make("SnapshotNotFound", ErrorCode.SNAPSHOT_NOT_FOUND)
SnapshotIncomplete = _make("SnapshotIncomplete", ErrorCode.SNAPSHOT_INCOMPLETE)
SnapshotCorrupt = _make("SnapshotCorrupt", ErrorCode.SNAPSHOT_CORRUPT)
ConfigInvalid = _make("ConfigInvalid", ErrorCode.CONFIG_INVALID)
UnsupportedArchitecture = _make("UnsupportedArchitecture", ErrorCode.UNSUPPORTED_ARCHITECTURE)
CompatKnownBad = _make("CompatKnownBad", ErrorCode.COMPAT_KNOWN_BAD)
InsufficientMemory = _make("InsufficientMemory", ErrorCode.INSUFFICIENT_MEMORY)
LoadFailed = _make("LoadFailed", ErrorCode.LOAD_FAILED)
LoadTimeout = _make("LoadTimeout", ErrorCode.LOAD_TIMEOUT)
CanaryFailed = _make("CanaryFailed", ErrorCode.CANARY_FAILED)
CanaryTimeout = _make("CanaryTimeout", ErrorCode.CANARY_TIMEOUT)
ModelNotReady = _make("ModelNotReady", ErrorCode.MODEL_NOT_READY)
ModelQuarantined = _make("ModelQuarantined", ErrorCode.MODEL_QUARANTINED)
WorkerCrashed = _make("WorkerCrashed", ErrorCode.WORKER_CRASHED)
WorkerOOM = _make("WorkerOOM", ErrorCode.WORKER_OOM)
WorkerHung = _make("WorkerHung", ErrorCode.WORKER_HUNG)
PeerUnavailable = _make("PeerUnavailable", ErrorCode.PEER_UNAVAILABLE)
RequestTimeout = _make("RequestTimeout", ErrorCode.REQUEST_TIMEOUT)
Cancelled = _make("Cancelled", ErrorCode.CANCELLED)
Overloaded = _make("Overloaded", ErrorCode.OVERLOADED)
ShuttingDown = _make("ShuttingDown", ErrorCode.SHUTTING_DOWN)
SupervisorUnavailable = _make("SupervisorUnavailable", ErrorCode.SUPERVISOR_UNAVAILABLE)
InternalError = _make("InternalError", ErrorCode.INTERNAL)

_BY_CODE: dict[ErrorCode, type[LmxError]] = {
    cls.code: cls for cls in LmxError.__subclasses__()  # type: ignore[misc]
}


def error_class(code: ErrorCode) -> type[LmxError]:
    return _BY_CODE[code]
