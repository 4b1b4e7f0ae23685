"""Prometheus metrics: counters and histograms the supervisor updates as things happen, and gauges
read from status at scrape time (so a gauge can never disagree with `lmxctl status`). Served by
`lmxctl metrics` and, when `metrics_port` is set, on 127.0.0.1:PORT/metrics. Names are the contract
of docs/alerts.yaml; tests/test_metrics.py checks every rule there names one of them."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.states import ModelState, ModelStatus
from supervisor.persistence.records import CrashRecord

# What a scrape reads, as one moment: status's supervisor section and each model's typed entry.
Status = Callable[[], tuple[dict[str, Any], list[ModelStatus]]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def _prefix_cache(models: list[ModelStatus]) -> Iterator[Any]:
    """The workers' prefix caches (status's `prefix_cache`): counters summed over each model's workers."""
    families = {
        "hit_tokens_total": CounterMetricFamily("lmx_prefix_cache_hit_tokens",
                                                "Prompt tokens served from the prefix cache.", labels=["model"]),
        "miss_tokens_total": CounterMetricFamily("lmx_prefix_cache_miss_tokens",
                                                 "Prompt tokens prefilled (not in the prefix cache).", labels=["model"]),
        "evictions_total": CounterMetricFamily("lmx_prefix_cache_evictions",
                                               "Prefix cache entries evicted for its byte budget.", labels=["model"]),
        "bytes": GaugeMetricFamily("lmx_prefix_cache_bytes", "Bytes of KV held by the prefix cache.",
                                   labels=["model"]),
        "entries": GaugeMetricFamily("lmx_prefix_cache_entries", "Entries in the prefix cache.", labels=["model"]),
        "disk_bytes": GaugeMetricFamily("lmx_prefix_cache_disk_bytes", "Bytes of hot prefixes on disk.",
                                        labels=["model"]),
    }
    for m in models:
        pc = m.prefix_cache or {}
        for key, family in families.items():
            if key in pc:
                family.add_metric([m.id], pc[key])
    yield from families.values()


def _supervisor_gauges(sup: dict[str, Any], connections: int) -> Iterator[GaugeMetricFamily]:
    """The supervisor's own gauges (status's `supervisor`): one unlabelled sample each."""
    yield GaugeMetricFamily("lmx_supervisor_uptime_seconds", "Seconds since the supervisor started.",
                            value=sup["uptime_s"])
    yield GaugeMetricFamily("lmx_supervisor_rss_bytes", "Resident memory of the supervisor process.",
                            value=sup["rss_bytes"])
    yield GaugeMetricFamily("lmx_supervisor_client_connections", "Open client connections.",
                            value=connections)
    yield GaugeMetricFamily("lmx_supervisor_safe_mode", "1 when started in crash-loop safe mode.",
                            value=1 if sup["safe_mode"] else 0)
    yield GaugeMetricFamily("lmx_store_degraded",
                            "1 while store writes fail and wait in memory to be retried (lock, full disk).",
                            value=1 if sup.get("store_degraded") else 0)
    yield GaugeMetricFamily("lmx_memory_budget_bytes", "Memory budget for models.",
                            value=sup["memory_budget_bytes"])
    yield GaugeMetricFamily("lmx_memory_reserved_bytes", "Memory reserved by admitted models.",
                            value=sup["memory_reserved_bytes"])
    yield GaugeMetricFamily("lmx_memory_stranded_bytes",
                            "Memory dead workers did not give back (held from the budget).",
                            value=sup["memory_stranded_bytes"])


def _model_gauges(models: list[ModelStatus]) -> Iterator[GaugeMetricFamily]:
    """Per-model gauges (status's `models`), labelled by model: the state as one-hot, the failure and
    queue counts, and the worker memory of its last heartbeat (a key absent there gives no sample)."""
    state = GaugeMetricFamily("lmx_model_state", "1 for the state the model is in, 0 for the others.",
                              labels=["model", "state"])
    # The kind as an info metric (join on model): every other series keeps its labels.
    info = GaugeMetricFamily("lmx_model_info", "1 per model, labelled with its kind (generate, embed).",
                             labels=["model", "kind"])
    gauges = {
        "quarantined": GaugeMetricFamily("lmx_model_quarantined", "1 when the model is QUARANTINED.",
                                         labels=["model"]),
        "failures": GaugeMetricFamily("lmx_model_failures_in_window",
                                      "Counted failures within the restart window.", labels=["model"]),
        "queued": GaugeMetricFamily("lmx_model_queued_requests", "Requests waiting for the worker.",
                                    labels=["model"]),
        "active": GaugeMetricFamily("lmx_model_active_requests",
                                    "Requests the worker is generating (sent to it, not ended yet).",
                                    labels=["model"]),
        "rss_bytes": GaugeMetricFamily("lmx_worker_rss_bytes", "Worker resident memory (last heartbeat).",
                                       labels=["model"]),
        "mlx_active_bytes": GaugeMetricFamily("lmx_worker_mlx_active_bytes",
                                              "mlx active memory in the worker (last heartbeat).",
                                              labels=["model"]),
        "mlx_peak_bytes": GaugeMetricFamily("lmx_worker_mlx_peak_bytes",
                                            "mlx peak memory in the worker (last heartbeat).",
                                            labels=["model"]),
    }
    for m in models:
        mid = m.id
        for st in ModelState:
            state.add_metric([mid, st.value], 1 if m.state == st.value else 0)
        info.add_metric([mid, m.kind or "generate"], 1)
        gauges["quarantined"].add_metric([mid], 1 if m.quarantined else 0)
        gauges["failures"].add_metric([mid], m.failures_in_window)
        gauges["queued"].add_metric([mid], m.queued)
        gauges["active"].add_metric([mid], m.active)
        memory = m.memory or {}
        for key in ("rss_bytes", "mlx_active_bytes", "mlx_peak_bytes"):
            if key in memory:
                gauges[key].add_metric([mid], memory[key])
    yield state
    yield info
    yield from gauges.values()


class _StatusCollector(Collector):
    def __init__(self, status: Status, connections: Callable[[], int]) -> None:
        self._status = status
        self._connections = connections

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # One status read per scrape, so every family describes the same moment.
        sup, models = self._status()
        yield from _supervisor_gauges(sup, self._connections())
        yield from _model_gauges(models)
        yield from _prefix_cache(models)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("lmx_requests", "Generate requests by outcome (ok or the error code).",
                                ["model", "outcome"], registry=r)
        self.tokens = Counter("lmx_generated_tokens", "Tokens generated for clients.", ["model"], registry=r)
        self.ttft = Histogram("lmx_time_to_first_token_seconds", "From request arrival to its first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmx_inter_token_latency_seconds", "Between consecutive chunks of a stream.",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.restarts = Counter("lmx_model_restarts", "Restarts after a failure.", ["model"], registry=r)
        self.crashes = Counter("lmx_worker_crashes", "Model failures by classification (the error code).",
                               ["model", "classification"], registry=r)
        self.group_failures = Counter("lmx_group_rank_failures", "Group failures by the rank and host that "
                                      "caused them (docs/distributed.md).", ["model", "rank", "host", "classification"],
                                      registry=r)
        self.store_write = Histogram("lmx_store_write_seconds", "Latency of writes to the SQLite store.",
                                     buckets=_STORE_BUCKETS, registry=r)
        self.events = Counter("lmx_events", "Lifecycle events published.", ["event"], registry=r)

    def failed(self, model: str, code: str, record: CrashRecord) -> None:
        """A model's failure, by its classification; a group's also by the rank and host that failed."""
        self.crashes.labels(model, code).inc()
        if record.rank is not None:
            self.group_failures.labels(model, str(record.rank), str(record.host), code).inc()

    def watch_status(self, status: Status, connections: Callable[[], int]) -> None:
        self.registry.register(_StatusCollector(status, connections))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-stream timing for TTFT and inter-token latency, and its generated tokens, counted as its
    chunks come (a request cancelled or timed out mid-answer counts what it was sent), kept in the
    request's sink."""

    __slots__ = ("metrics", "model", "start", "last", "tokens")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.start = time.monotonic()
        self.last: float | None = None
        self.tokens = 0  # counted so far

    def chunk(self, tokens: int = 0) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        else:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now
        self._count(tokens)

    def final(self, completion_tokens: int) -> None:
        """Its final's usage: whatever of it no chunk carried."""
        self._count(completion_tokens - self.tokens)

    def _count(self, tokens: int) -> None:
        if tokens > 0:
            self.tokens += tokens
            self.metrics.tokens.labels(self.model).inc(tokens)


async def serve_http(metrics: Metrics, port: int, log: Any) -> asyncio.AbstractServer:
    """GET /metrics on 127.0.0.1:PORT, answered on the event loop (no thread reads our state)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                body, status, ctype = metrics.render(), b"200 OK", CONTENT_TYPE.encode()
            else:
                body, status, ctype = b"not found: GET /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    log.info("metrics.listening", address=f"http://127.0.0.1:{port}/metrics")
    return server
