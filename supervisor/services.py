"""What the daemon's parts share, handed to each at construction: the config, the store, the hub,
the memory ledger, where lifecycle events and metrics go, the warm spares and the peer link's ranks.

Both records here are frozen and built from finished parts, in the composition root (daemon.py):
first `WorkerHost`, what workers need of their supervisor (the warm spares and the ranks placed for
peers are built from it), then `Services`, last, from it and those. The config is the one thing
that changes: it sits behind one `ConfigRef` that a reload replaces (Operations' reload), and every
part reads `services.config` afresh (nothing keeps a copy that a reload would have to chase).

Events and metrics are typed by the Protocols below, not by the control plane's classes
(control.events.EventPublisher, control.metrics.Metrics): this module sits under lifecycle in the
layers, and control above it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from supervisor.admission.memory import MemoryLedger
from supervisor.config import Config
from supervisor.persistence.records import CrashRecord
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

    def failed(self, model: str, code: str, record: CrashRecord) -> None: ...

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

    def failed(self, model: str, code: str, record: CrashRecord) -> None:
        pass

    def render(self) -> bytes:
        return b""


class ConfigRef:
    """The one current config: a reload replaces it here and nowhere else."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def replace(self, new: Config) -> None:
        self.current = new


def _ref(config: "Config | ConfigRef") -> ConfigRef:
    return config if isinstance(config, ConfigRef) else ConfigRef(config)


@dataclasses.dataclass(frozen=True)
class WorkerHost:
    """What a worker (a spare, a rank placed for a peer) needs of its supervisor: the workers'
    Host and placed's MemberHost protocols. Built before the parts made from it."""

    configs: ConfigRef
    store: Store
    hub: "WorkerHub | None"
    worker_endpoint: str  # where workers connect (the hub's socket)
    log_dir: Path | None = None  # the state dir's logs/ (None: a throwaway runtime in a test)
    ledger: MemoryLedger = dataclasses.field(default_factory=lambda: MemoryLedger(2**62))

    def __post_init__(self) -> None:  # a plain Config is taken as its own reference
        object.__setattr__(self, "configs", _ref(self.configs))

    @property
    def config(self) -> Config:
        return self.configs.current

    @property
    def state_dir(self) -> Path | None:
        return self.log_dir.parent if self.log_dir is not None else None


@dataclasses.dataclass(frozen=True)
class Services(WorkerHost):
    events: Events = dataclasses.field(default_factory=NoEvents)
    metrics: Counters = dataclasses.field(default_factory=NoCounters)
    spares: "SparePool | None" = None
    # evict = "lru": make room for (model id, bytes); None where a start must never unload others.
    evict: Callable[[str, int], Awaitable[bool]] | None = None
    placed: "PlacedRanks | None" = None  # ranks run here for peers' groups (the peer link)

    @classmethod
    def of(cls, host: WorkerHost, **parts: Any) -> "Services":
        """The services, last, from the host and the parts built from it."""
        return cls(**{f.name: getattr(host, f.name) for f in dataclasses.fields(WorkerHost)}, **parts)

    def throwaway(self, **changes: Any) -> "Services":
        """A copy for a runtime of its own (a probe's): a `config` given here does not follow reloads."""
        if "config" in changes:
            changes["configs"] = ConfigRef(changes.pop("config"))
        return dataclasses.replace(self, **changes)
