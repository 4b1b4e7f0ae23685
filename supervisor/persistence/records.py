"""The typed records the store keeps and gives back: a model's failures, crash records, flags and
live worker, with their row and wire shapes. Plain frozen data, importable by every layer above
persistence (a leaf: it imports nothing of the project)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Failure:
    """One entry of a model's failure ledger, which the restart policy counts."""
    at: float  # wall-clock seconds: the ledger outlives the process, so monotonic time cannot
    revision: str
    code: str
    counted: bool = True  # an innocent victim restarts but is not held against its model


@dataclass(frozen=True)
class ModelFlags:
    """What the store remembers of a model across restarts (its `models` row). A model never seen
    has every field at its default."""
    quarantined: bool = False
    quarantine: dict[str, Any] | None = None  # the summary ModelQuarantined carries (its message too)
    lkg_revision: str | None = None  # last known good: the revision a rollback goes to
    running_revision: str | None = None  # what ran last (a rollback's revision differs from the config's)
    configured_revision: str | None = None  # the config's revision when running_revision was written
    wanted: bool | None = None  # the operator's last load (True) or unload (False); None: as configured

    COLUMNS = ("quarantined", "quarantine", "lkg_revision", "running_revision", "configured_revision", "wanted")

    @classmethod
    def from_row(cls, row: tuple | None) -> "ModelFlags":
        if row is None:
            return cls()
        quarantined, quarantine, lkg, running, configured, wanted = row
        return cls(bool(quarantined), json.loads(quarantine) if quarantine else None, lkg, running, configured,
                   None if wanted is None else bool(wanted))

    def copy(self) -> "ModelFlags":
        """The summary is a dict: a caller that changes it must not change what the store holds."""
        return dataclasses.replace(self, quarantine=dict(self.quarantine) if self.quarantine else None)


# The crashes table's columns, in its order (SELECT * adds `id` first).
CRASH_COLUMNS = ("model", "revision", "at", "code", "cause", "victim", "signal", "exit_code", "phase",
                 "request_id", "worker_pid", "memory", "stderr_tail", "rank", "host")


@dataclass(frozen=True)
class CrashRecord:
    """One failure as history shows it: its code and cause, the phase it struck in, the request
    the worker was serving, and what the worker last showed. `id` is the store's row (None while
    the write is queued); `rank` and `host` name a group's failed rank."""
    model: str
    revision: str
    at: float  # wall-clock seconds
    code: str
    cause: str | None = None
    victim: bool = False  # died with another (a group's rank, a shared fate): not held against it
    signal: str | None = None
    exit_code: int | None = None
    phase: str | None = None  # the model's state when it failed: LOADING, CANARY, READY, ...
    request_id: str | None = None
    worker_pid: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    stderr_tail: tuple[str, ...] = ()
    rank: int | None = None
    host: str | None = None
    id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrashRecord":
        """From history's dict shape (what from_row reads a row into)."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        fields["memory"] = dict(d.get("memory") or {})
        fields["stderr_tail"] = tuple(d.get("stderr_tail") or ())
        fields["victim"] = bool(d.get("victim"))
        return cls(**fields)

    @classmethod
    def from_row(cls, names: list[str], row: tuple) -> "CrashRecord":
        d = dict(zip(names, row))
        d["memory"] = json.loads(d["memory"] or "{}")
        d["stderr_tail"] = d["stderr_tail"].split("\n") if d["stderr_tail"] else []
        return cls.from_dict(d)

    def to_row(self) -> list[Any]:
        """The values of CRASH_COLUMNS, as the table stores them."""
        row = self.to_dict()
        row["memory"] = json.dumps(self.memory)
        row["stderr_tail"] = "\n".join(self.stderr_tail)
        row["victim"] = int(self.victim)
        return [row[c] for c in CRASH_COLUMNS]

    def to_dict(self) -> dict[str, Any]:
        """History's shape (`lmxctl history`, HistoryReply): `id` first, then every column."""
        return {"id": self.id, **{c: getattr(self, c) for c in CRASH_COLUMNS},
                "memory": dict(self.memory), "stderr_tail": list(self.stderr_tail)}

    def event_fields(self) -> dict[str, Any]:
        """The `model.failed` event's fields: no row id, no time (the event has its own), and a
        group's rank and host only when it is a group's failure."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("id", "at")}
        if self.rank is None and self.host is None:
            del fields["rank"], fields["host"]
        return fields


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker, written when it turns READY, so that the next supervisor run can adopt it
    within its orphan grace (the pid and its start time prove it is the same process)."""
    pid: int
    start_time: float
    token: str
    revision: str
    socket: str  # the hub endpoint it connects to
    boot_id: int  # the supervisor boot that spawned it

    COLUMNS = ("pid", "start_time", "token", "revision", "socket", "boot_id")

    def to_row(self) -> tuple:
        return tuple(getattr(self, c) for c in self.COLUMNS)
