"""The TOML config (BRIEF §6): parsed and validated once into frozen dataclasses, hashed into revisions."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import confinement, kinds, topology
from supervisor.clients import ClientKey, check_listen, parse_clients
from supervisor.configproblem import Problem


class ConfigError(Exception):
    """A broken config file: names the file, the key and what was expected."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file, self.key, self.problem = file, key, problem


@dataclass(frozen=True)
class SupervisorSettings:
    memory_budget_bytes: int = 0
    memory_reserve_bytes: int = 4 * 2**30  # kept for everything else when the budget is 0 (auto)
    evict: str = ""  # "lru": make room by unloading the least recently used idle model
    model_roots: tuple[str, ...] = ()
    orphan_grace_s: float = 60.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    decode_stall_s: float = 60.0
    prefill_stall_s: float = 120.0
    drain_grace_s: float = 30.0
    stop_timeout_s: float = 5.0
    load_timeout_s: float = 300.0
    # The handshake, both ways: a spawned worker's hello must come this soon, and a worker that got
    # no Init this long after its hello gives up and exits (a warm spare waits as long as we live).
    handshake_timeout_s: float = 60.0
    # After a worker exits, how long the next admission waits for its memory to come back.
    memory_return_timeout_s: float = 5.0
    # This many starts within the window without a clean shutdown: start in safe mode.
    crash_loop_starts: int = 5
    crash_loop_window_s: float = 300.0
    # lmxctl repair may download from the Hugging Face hub (models with hub_repo); off by default.
    hub_downloads: bool = False
    hub_endpoint: str = ""  # default: huggingface_hub's own (it honours HF_ENDPOINT)
    # STATE_DIR/logs/supervisor.log rotates at this size and keeps this many old files.
    log_max_bytes: int = 20_000_000
    log_backups: int = 5
    # Prometheus /metrics on 127.0.0.1:PORT; 0 = off (lmxctl metrics works either way).
    metrics_port: int = 0
    # Every request has a deadline: the client's, capped by this (and this when it sets none).
    request_timeout_s: float = 600.0
    # Requests in the supervisor (running + queued) over all models, and per client connection.
    max_requests: int = 1024
    max_requests_per_client: int = 256
    # Messages queued for one client connection (ZeroMQ's send high-water mark): a client that stops
    # reading its stream has its request cancelled past it. Applies to connections made after a reload.
    client_buffer_messages: int = 10_000
    # Workers started ahead of need (interpreter up, mlx-lm imported): a (re)start takes one and
    # pays only load + canary. Each idles at ~250 MB RSS.
    warm_spares: int = 0
    # Optional remote control endpoint, "tcp://HOST:PORT", only with CURVE: this server secret key
    # file (lmxctl keys new NAME) and the [[clients]] allow-list. "" = ipc only.
    listen: str = ""
    curve_secret_key_file: str = ""
    # At start, a store another process holds locked is waited for this long; then the supervisor
    # exits 75 (launchd/systemd try again) rather than start from an empty store. Within the
    # default orphan grace, so the last run's workers can still be adopted.
    store_lock_wait_s: float = 30.0
    # History (crash records, failures, boots) older than this is pruned, and past this many rows
    # per model (boots: in all) the oldest go, so the store cannot grow without bound.
    history_retention_s: float = 30 * 86400.0
    history_max_rows: int = 1000
    # Groups (docs/distributed.md): where this host's ranks listen for each other (default: the
    # host of `listen`, else 127.0.0.1), and how long a peer's link may stay silent before its
    # host counts as lost (PEER_UNAVAILABLE for the group).
    data_address: str = ""
    link_timeout_s: float = 10.0


@dataclass(frozen=True)
class RestartSettings:
    quarantine_after: int = 3
    window_s: float = 600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 60.0


@dataclass(frozen=True)
class CanarySettings:
    prompt: str = "Say hello."
    expect: str | None = None
    max_tokens: int = 8
    timeout_s: float = 60.0


# Model keys added after revisions were first recorded, with their defaults.
_ADDED_LATER = {"group": None, "hub_repo": None, "hub_revision": None, "max_batch_size": 8, "prefill_step_size": 512,
                "max_queue": 64, "idle_ttl_s": 0.0, "pinned": False, "stream_interval_s": 0.05,
                "prefix_cache_bytes": -1, "prefix_cache_disk_bytes": -1, "prefix_cache_persist": True,
                "kind": kinds.GENERATE}


@dataclass(frozen=True)
class ModelConfig:
    id: str
    path: str
    autoload: bool = True
    memory_limit_bytes: int = 0
    context_tokens: int = 4096  # the KV cache the memory estimate budgets for
    checksums: bool = False  # SHA-256 of every file against a manifest at admission
    mirror: str | None = None  # a local directory with the same snapshot: lmxctl repair's source
    hub_repo: str | None = None  # "org/name": repair's source when there is no mirror
    hub_revision: str | None = None  # the commit (or tag) the snapshot came from; required with hub_repo
    worker_command: tuple[str, ...] | None = None
    max_batch_size: int = 8  # requests decoded together in the worker (1 = one at a time)
    prefill_step_size: int = 512  # prompt tokens per batch step: bounds how long prefill holds decoding up
    # After a stream's first chunk, tokens that come within this of the last send go together.
    stream_interval_s: float = 0.05
    max_queue: int = 64  # requests waiting beyond the batch; past it: OVERLOADED
    # The worker's prefix KV cache (supervisor.admission.kvcache): memory for it (-1: twice the KV of
    # context_tokens, 0: off), disk for hot prefixes across workers (-1: four times that), and
    # whether they go to disk at all.
    prefix_cache_bytes: int = -1
    prefix_cache_disk_bytes: int = -1
    prefix_cache_persist: bool = True
    idle_ttl_s: float = 0.0  # READY and unused this long: unload (0 = never); the next request loads it
    pinned: bool = False  # never evicted, never unloaded for idleness
    canary: CanarySettings = field(default_factory=CanarySettings)
    group: topology.GroupConfig | None = None  # served by ranks on several hosts (docs/distributed.md)
    kind: str = kinds.GENERATE  # supervisor.kinds: what it serves (its engine, admission, canary)

    @functools.cached_property
    def revision(self) -> str:
        """A stable hash of the resolved section: equal sections, equal revisions."""
        fields = dataclasses.asdict(self)
        for key, default in _ADDED_LATER.items():  # at their defaults, they leave older revisions unchanged
            if fields[key] == default:
                del fields[key]
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Config:
    source: str
    supervisor: SupervisorSettings
    restart: RestartSettings
    models: tuple[ModelConfig, ...]
    clients: tuple[ClientKey, ...] = ()  # [[clients]]: who may use the tcp endpoint, and as what
    peers: tuple[topology.PeerConfig, ...] = ()  # [[peers]]: supervisors this one may place ranks on

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)


MAX_ID_CHARS = 128  # a model id is a file name's part: well under every filesystem's 255 bytes


def path_component_problem(name: str) -> str | None:
    """Why `name` cannot be one component of a path (a model id names a cache dir, a log file, a
    hostfile in the state dir), or None: ASCII letters, digits, '-', '_' and '.', not starting with
    '.' (so never '.', '..' or a hidden file), 1 to MAX_ID_CHARS characters."""
    if not name:
        return "expected a non-empty name, got ''"
    if len(name) > MAX_ID_CHARS:
        return f"expected at most {MAX_ID_CHARS} characters, got {len(name)}"
    if name.startswith("."):
        return f"must not start with '.' (never '.' or '..'), got {name!r}"
    if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        return (f"expected letters, digits, '-', '_', '.' (ASCII only: no '/', '\\', spaces or control "
                f"characters), got {name!r}")
    return None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


class _Reader:
    """Pulls typed keys out of one TOML table; leftover keys are an error (typos must not pass)."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, "expected a table")
        self.file, self.prefix, self.table = file, prefix, dict(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def take(self, name: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
        if name not in self.table:
            if default is dataclasses.MISSING:
                raise ConfigError(self.file, self.key(name), "required key is missing")
            return default
        value = self.table.pop(name)
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(self.file, self.key(name),
                              f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
        if name.endswith(("_s", "_bytes")) and value < 0:
            raise ConfigError(self.file, self.key(name), f"must be >= 0, got {value!r}")
        return value

    def take_list(self, name: str, kind: type, default: Any) -> tuple | None:
        if name not in self.table:
            return default
        value = self.table.pop(name)
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise ConfigError(self.file, self.key(name), f"expected a list of {kind.__name__}s")
        return tuple(value)

    def finish(self) -> None:
        if self.table:
            names = ", ".join(self.key(k) for k in sorted(self.table))
            raise ConfigError(self.file, names, "unknown key")


def _section(file: str, name: str, raw: dict, cls: type) -> Any:
    reader = _Reader(file, name, raw.pop(name, {}))
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "model_roots":
            values[f.name] = reader.take_list(f.name, str, ())
        else:
            values[f.name] = reader.take(f.name, type(f.default), f.default)
    reader.finish()
    return cls(**values)


def _canary(file: str, prefix: str, raw: Any) -> CanarySettings:
    reader = _Reader(file, prefix, raw)
    d = CanarySettings()
    canary = CanarySettings(
        prompt=reader.take("prompt", str, d.prompt),
        expect=reader.take("expect", str, None),
        max_tokens=reader.take("max_tokens", int, d.max_tokens),
        timeout_s=reader.take("timeout_s", float, d.timeout_s),
    )
    reader.finish()
    if canary.max_tokens < 1:
        raise ConfigError(file, f"{prefix}.max_tokens", "must be >= 1")
    return canary


def _mirror(reader: _Reader, base_dir: Path) -> str | None:
    value = reader.take("mirror", str, None)
    return str((base_dir / os.path.expanduser(value)).resolve()) if value else None


def _group(file: str, prefix: str, reader: _Reader, peers: tuple) -> topology.GroupConfig | None:
    """A group serves one request at a time, without a prefix cache (docs/distributed.md)."""
    if "group" not in reader.table:
        return None
    try:
        group = topology.parse_group(prefix, reader.table.pop("group"), peers)
    except Problem as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    if reader.table.get("max_batch_size", 1) != 1:
        raise ConfigError(file, f"{prefix}.max_batch_size", "a group serves one request at a time: must be 1")
    reader.table["max_batch_size"] = 1
    reader.table.setdefault("prefix_cache_bytes", 0)
    return group


def _model(file: str, index: int, raw: Any, base_dir: Path, peers: tuple = ()) -> ModelConfig:
    prefix = f"models[{index}]"
    reader = _Reader(file, prefix, raw)
    model_id = reader.take("id", str)
    problem = path_component_problem(model_id)
    if problem:
        raise ConfigError(file, f"{prefix}.id", f"{problem}: the id names files and directories in the state dir")
    path = str((base_dir / os.path.expanduser(reader.take("path", str))).resolve())
    try:  # before `group` is read: an embed model refuses one
        kind = kinds.resolve(prefix, reader.table, path)
    except Problem as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    group = _group(file, prefix, reader, peers)
    model = ModelConfig(
        id=model_id,
        path=path,
        kind=kind,
        autoload=reader.take("autoload", bool, True),
        memory_limit_bytes=reader.take("memory_limit_bytes", int, 0),
        context_tokens=reader.take("context_tokens", int, 4096),
        checksums=reader.take("checksums", bool, False),
        mirror=_mirror(reader, base_dir),
        hub_repo=reader.take("hub_repo", str, None),
        hub_revision=reader.take("hub_revision", str, None),
        max_batch_size=reader.take("max_batch_size", int, 8),
        prefill_step_size=reader.take("prefill_step_size", int, 512),
        stream_interval_s=reader.take("stream_interval_s", float, 0.05),
        max_queue=reader.take("max_queue", int, 64),
        prefix_cache_bytes=reader.take("prefix_cache_bytes", int, -1),
        prefix_cache_disk_bytes=reader.take("prefix_cache_disk_bytes", int, -1),
        prefix_cache_persist=reader.take("prefix_cache_persist", bool, True),
        idle_ttl_s=reader.take("idle_ttl_s", float, 0.0),
        pinned=reader.take("pinned", bool, False),
        worker_command=reader.take_list("worker_command", str, None),
        canary=_canary(file, f"{prefix}.canary", reader.table.pop("canary", {})),
        group=group,
    )
    reader.finish()
    _check_model(file, prefix, model)
    return model


def _check_model(file: str, prefix: str, model: ModelConfig) -> None:
    for key in ("max_batch_size", "prefill_step_size"):
        if getattr(model, key) < 1:
            raise ConfigError(file, f"{prefix}.{key}", "must be >= 1")
    for key in ("prefix_cache_bytes", "prefix_cache_disk_bytes"):
        if getattr(model, key) < -1:
            raise ConfigError(file, f"{prefix}.{key}", "must be -1 (auto), 0 (off) or a size in bytes")
    if not 0.0 <= model.stream_interval_s <= 1.0:
        raise ConfigError(file, f"{prefix}.stream_interval_s", "must be between 0 and 1 (seconds)")
    if model.max_queue < 0:
        raise ConfigError(file, f"{prefix}.max_queue", "must be >= 0")
    if model.hub_repo and not model.hub_revision:
        raise ConfigError(file, f"{prefix}.hub_revision",
                          "required with hub_repo (pin the commit the snapshot came from)")
    if model.hub_repo and model.hub_repo.count("/") != 1:
        raise ConfigError(file, f"{prefix}.hub_repo", f"expected \"org/name\", got {model.hub_repo!r}")


def parse(text: str, file: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a whole config. Relative model paths resolve against the config file's directory."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", str(exc)) from None
    base_dir = base_dir or Path.cwd()
    supervisor = _section(file, "supervisor", raw, SupervisorSettings)
    restart = _section(file, "restart", raw, RestartSettings)
    try:
        peers = topology.parse_peers(raw.pop("peers", []), base_dir)
    except Problem as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    models_raw = raw.pop("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError(file, "models", "expected an array of tables ([[models]])")
    models = tuple(_model(file, i, m, base_dir, peers) for i, m in enumerate(models_raw))
    seen: set[str] = set()
    for i, m in enumerate(models):
        if m.id in seen:
            raise ConfigError(file, f"models[{i}].id", f"duplicate model id {m.id!r}")
        seen.add(m.id)
    try:
        clients = parse_clients(raw.pop("clients", []), base_dir)
        supervisor = check_listen(supervisor, base_dir)
    except Problem as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    for key, problem in confinement.config_problems(supervisor.model_roots, models)[:1]:
        raise ConfigError(file, key, problem)
    if raw:
        raise ConfigError(file, ", ".join(sorted(raw)), "unknown key")
    if supervisor.evict not in ("", "lru"):
        raise ConfigError(file, "supervisor.evict", f"expected \"lru\" or \"\", got {supervisor.evict!r}")
    if not 0 <= supervisor.metrics_port <= 65535:
        raise ConfigError(file, "supervisor.metrics_port", f"expected 0 (off) or a TCP port, got {supervisor.metrics_port}")
    if supervisor.client_buffer_messages < 1:
        raise ConfigError(file, "supervisor.client_buffer_messages", "must be >= 1")
    if supervisor.history_retention_s <= 0:
        raise ConfigError(file, "supervisor.history_retention_s", "must be > 0 (history is always bounded)")
    if supervisor.history_max_rows < max(10, restart.quarantine_after):
        raise ConfigError(file, "supervisor.history_max_rows",
                          f"must be >= 10 and >= restart.quarantine_after ({restart.quarantine_after})")
    if supervisor.heartbeat_timeout_s <= supervisor.heartbeat_interval_s:
        raise ConfigError(file, "supervisor.heartbeat_timeout_s", "must exceed heartbeat_interval_s")
    return Config(file, supervisor, restart, models, clients, peers)


def load(path: str | os.PathLike) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), "(file)", f"cannot read: {exc.strerror}") from None
    return parse(text, str(p), p.resolve().parent)
