"""What the daemon's parts share, handed to each once at construction: never set on them afterwards.

`config` is the one mutable field: a reload replaces it here, and every runtime and control server
reads the new one from here (nothing keeps a copy that a reload would have to chase)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config
from supervisor.control.events import EventPublisher, NoEvents
from supervisor.control.metrics import Metrics
from supervisor.persistence.store import Store

if TYPE_CHECKING:
    from supervisor.workers.hub import WorkerHub
    from supervisor.workers.placed import PlacedRanks
    from supervisor.workers.spares import SparePool


@dataclasses.dataclass
class Services:
    config: Config
    store: Store
    hub: "WorkerHub | None"
    worker_endpoint: str  # where workers connect (the hub's socket)
    log_dir: Path | None = None  # the state dir's logs/ (None: a throwaway runtime in a test)
    ledger: MemoryLedger = dataclasses.field(default_factory=lambda: MemoryLedger(2**62))
    events: EventPublisher | NoEvents = dataclasses.field(default_factory=NoEvents)
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    spares: "SparePool | None" = None
    # evict = "lru": make room for (model id, bytes); None where a start must never unload others.
    evict: Callable[[str, int], Awaitable[bool]] | None = None
    placed: "PlacedRanks | None" = None  # ranks run here for peers' groups (the peer link)

    @property
    def state_dir(self) -> Path | None:
        return self.log_dir.parent if self.log_dir is not None else None

    def throwaway(self, **changes: Any) -> "Services":
        """A copy for a runtime of its own (a probe's): its config does not follow reloads."""
        return dataclasses.replace(self, **changes)
