"""Where a group's ranks run (docs/distributed.md): a model's `[models.group]` and the `[[peers]]`
this supervisor may place ranks on, parsed and checked; and the data addresses the ranks' own
traffic (mx.distributed's ring or JACCL) binds to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from supervisor.configproblem import Problem

BACKENDS = ("ring", "jaccl")
PARALLEL = ("", "tensor", "pipeline")  # "": what the model supports (tensor first)
LOCAL = "local"


@dataclass(frozen=True)
class GroupConfig:
    hosts: tuple[str, ...]  # rank i runs on hosts[i]: "local" or a [[peers]] name; hosts[0] is "local"
    backend: str = "ring"
    parallel: str = ""
    # The ring's TCP ports: rank i listens on ring_port + i on its host's data address (0: free
    # ports picked at each start, which works only when every rank is local).
    ring_port: int = 0
    # JACCL: each rank's RDMA devices (a JSON file, MLX_IBV_DEVICES) and the coordinator rank 0
    # runs (MLX_JACCL_COORDINATOR, "ip:port" on hosts[0]'s data address).
    jaccl_devices_file: str = ""
    jaccl_coordinator_port: int = 0

    @property
    def size(self) -> int:
        return len(self.hosts)


@dataclass(frozen=True)
class PeerConfig:
    name: str
    endpoint: str  # its supervisor's listen address, "tcp://HOST:PORT"
    server_key_file: str  # its public key
    client_cert: str  # our secret key file: the peer's [[clients]] names our public key, role "peer"
    data_address: str = ""  # where its ranks listen; default: the host of `endpoint`

    @property
    def data_host(self) -> str:
        return self.data_address or (urlsplit(self.endpoint).hostname or "127.0.0.1")


def _check_keys(key: str, table: Any, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise Problem(key, "expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise Problem(", ".join(f"{key}.{k}" for k in unknown), "unknown key")
    return table


def parse_group(prefix: str, raw: Any, peers: tuple[PeerConfig, ...]) -> GroupConfig:
    key = f"{prefix}.group"
    table = _check_keys(key, raw, {"hosts", "backend", "parallel", "ring_port", "jaccl_devices_file",
                                   "jaccl_coordinator_port"})
    hosts = table.get("hosts")
    if not isinstance(hosts, list) or len(hosts) < 2 or not all(isinstance(h, str) for h in hosts):
        raise Problem(f"{key}.hosts", "expected a list of at least two host names (\"local\" or a [[peers]] name)")
    if hosts[0] != LOCAL:
        raise Problem(f"{key}.hosts", "hosts[0] must be \"local\": rank 0 runs beside the supervisor that owns the group")
    names = {p.name for p in peers}
    for h in hosts:
        if h != LOCAL and h not in names:
            raise Problem(f"{key}.hosts", f"{h!r} is neither \"local\" nor a [[peers]] name")
    group = GroupConfig(tuple(hosts), table.get("backend", "ring"), table.get("parallel", ""),
                        table.get("ring_port", 0), table.get("jaccl_devices_file", ""),
                        table.get("jaccl_coordinator_port", 0))
    if group.backend not in BACKENDS:
        raise Problem(f"{key}.backend", f"expected \"ring\" or \"jaccl\", got {group.backend!r}")
    if group.parallel not in PARALLEL:
        raise Problem(f"{key}.parallel", f"expected \"tensor\" or \"pipeline\", got {group.parallel!r}")
    for port_key in ("ring_port", "jaccl_coordinator_port"):
        port = getattr(group, port_key)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535 - group.size:
            raise Problem(f"{key}.{port_key}", f"expected 0 (pick free ports) or a TCP port, got {port!r}")
    if group.ring_port == 0 and any(h != LOCAL for h in hosts) and group.backend == "ring":
        raise Problem(f"{key}.ring_port", "required when a rank runs on a peer: rank i listens on ring_port + i")
    if group.backend == "jaccl" and not group.jaccl_devices_file:
        raise Problem(f"{key}.jaccl_devices_file", "required with backend \"jaccl\"")
    return group


def parse_peers(raw: Any, base_dir: Path) -> tuple[PeerConfig, ...]:
    if not isinstance(raw, list):
        raise Problem("peers", "expected an array of tables ([[peers]])")
    out: list[PeerConfig] = []
    for i, table in enumerate(raw):
        key = f"peers[{i}]"
        table = _check_keys(key, table, {"name", "endpoint", "server_key_file", "client_cert", "data_address"})
        for req in ("name", "endpoint", "server_key_file", "client_cert"):
            if not isinstance(table.get(req), str) or not table[req]:
                raise Problem(f"{key}.{req}", "required key is missing")
        name = table["name"]
        if name == LOCAL or any(p.name == name for p in out):
            raise Problem(f"{key}.name", f"{name!r} is taken (\"local\" or another peer)")
        if not table["endpoint"].startswith("tcp://"):
            raise Problem(f"{key}.endpoint", f"expected \"tcp://HOST:PORT\", got {table['endpoint']!r}")
        files = {}
        for fkey in ("server_key_file", "client_cert"):
            path = (base_dir / os.path.expanduser(table[fkey])).resolve()
            if not path.is_file():
                raise Problem(f"{key}.{fkey}", f"no such file: {path}")
            files[fkey] = str(path)
        out.append(PeerConfig(name, table["endpoint"], files["server_key_file"], files["client_cert"],
                              table.get("data_address", "")))
    return tuple(out)


def local_data_address(data_address: str, listen: str) -> str:
    """Where this host's ranks listen: `data_address`, else the host of `listen` (unless it is a
    wildcard), else 127.0.0.1."""
    if data_address:
        return data_address
    host = urlsplit(listen).hostname if listen else None
    return host if host and host not in ("0.0.0.0", "*", "::") else "127.0.0.1"
