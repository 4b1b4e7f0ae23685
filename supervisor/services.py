"""What the daemon's parts share, handed to each at construction: the config, the store, the hub,
the memory ledger, where lifecycle events and metrics go, the warm spares and the peer link's ranks.

`config` is the one field meant to change: a reload replaces it here, and every runtime and control
server reads the new one from here (nothing keeps a copy that a reload would have to chase). The
daemon also sets `spares` and `placed` once, just after construction, because both are built from
these services (see docs/architecture.md, "Services").

Events and metrics are typed by the Protocols below, not by the control plane's classes
(control.events.EventPublisher, control.metrics.Metrics): this module sits under lifecycle in the
layers, and control above it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config
from supervisor.persistence.store import Store

if TYPE_CHECKING:
    from supervisor.workers.hub import WorkerHub
    from supervisor.workers.placed import PlacedRanks
    from supervisor.workers.spares import SparePool


class Events(Protocol):
    """Where lifecycle events go (control.events.EventPublisher in a daemon). Never blocks, never raises."""

    def publish(self, name: str, **fields: Any) -> None: ...


class Counters(Protocol):
    """The metrics the parts update as things happen (control.metrics.Metrics in a daemon): labelled
    prometheus counters and histograms, a failure by its classification, and their text."""

    requests: Any
    tokens: Any
    ttft: Any
    itl: Any
    restarts: Any

    def failed(self, model: str, code: str, record: Any) -> None: ...

    def render(self) -> bytes: ...  # the Prometheus text (lmxctl metrics)


class NoEvents:
    """For runtimes outside a daemon (and probes): publishing is a no-op."""

    seq = 0

    def publish(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Uncounted:
    """A labelled counter or histogram that counts nothing: `labels(...)` gives itself back."""

    def labels(self, *values: Any) -> "_Uncounted":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class NoCounters:
    """For runtimes outside a daemon (a test's, a throwaway one): counting is a no-op, as NoEvents is."""

    requests = tokens = ttft = itl = restarts = _Uncounted()

    def failed(self, model: str, code: str, record: Any) -> None:
        pass

    def render(self) -> bytes:
        return b""


@dataclasses.dataclass
class Services:
    config: Config
    store: Store
    hub: "WorkerHub | None"
    worker_endpoint: str  # where workers connect (the hub's socket)
    log_dir: Path | None = None  # the state dir's logs/ (None: a throwaway runtime in a test)
    ledger: MemoryLedger = dataclasses.field(default_factory=lambda: MemoryLedger(2**62))
    events: Events = dataclasses.field(default_factory=NoEvents)
    metrics: Counters = dataclasses.field(default_factory=NoCounters)
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
