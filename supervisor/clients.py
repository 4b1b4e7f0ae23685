"""Who may use the optional tcp endpoint, as the config declares it: the `[[clients]]` allow-list (a
CURVE public key and a role each) and `listen` with this server's secret key file. Parsed and checked
with the config, below the control plane that enforces them (control/auth.py), so that loading a
config needs neither zmq nor the ZAP handler."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol import keys
from supervisor.configproblem import Problem

ROLES = ("read", "admin", "peer")  # peer: a supervisor that places ranks of its groups here, nothing else


@dataclass(frozen=True)
class ClientKey:
    """One allowed remote client. The public key is public; the name is what logs show."""

    name: str
    role: str
    public_key: str  # z85
    public_key_file: str


def parse_clients(raw: Any, base_dir: Path) -> tuple[ClientKey, ...]:
    """`[[clients]]`: name (default: the key file's stem), public_key_file, role ("read" | "admin")."""
    if not isinstance(raw, list):
        raise Problem("clients", "expected an array of tables ([[clients]])")
    out: list[ClientKey] = []
    for i, table in enumerate(raw):
        prefix = f"clients[{i}]"
        if not isinstance(table, dict):
            raise Problem(prefix, "expected a table")
        unknown = sorted(set(table) - {"name", "public_key_file", "role"})
        if unknown:
            raise Problem(", ".join(f"{prefix}.{k}" for k in unknown), "unknown key")
        path, role = table.get("public_key_file"), table.get("role")
        if not isinstance(path, str) or not path:
            raise Problem(f"{prefix}.public_key_file", "required: a CURVE public key file (lmxctl keys new NAME)")
        if role not in ROLES:
            raise Problem(f"{prefix}.role", f"expected one of {', '.join(map(repr, ROLES))}, got {role!r}")
        resolved = (base_dir / os.path.expanduser(path)).resolve()
        name = table.get("name", resolved.name.split(".")[0])
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise Problem(f"{prefix}.name", f"expected letters, digits, '-', '_', '.', got {name!r}")
        try:
            public = keys.load_public(resolved).decode()
        except keys.KeyFileError as exc:
            raise Problem(f"{prefix}.public_key_file", str(exc)) from None
        for other in out:
            if other.name == name:
                raise Problem(f"{prefix}.name", f"duplicate client name {name!r}")
            if other.public_key == public:
                raise Problem(f"{prefix}.public_key_file", f"the same key as client {other.name!r}")
        out.append(ClientKey(name, role, public, str(resolved)))
    return tuple(out)


def check_listen(settings: Any, base_dir: Path) -> Any:
    """Validate `listen` + `curve_secret_key_file`; returns the settings with the key file resolved.
    Plain tcp is refused: a listener without a server key would serve anyone who can reach it."""
    if not settings.curve_secret_key_file and not settings.listen:
        return settings
    key_file = str((base_dir / os.path.expanduser(settings.curve_secret_key_file)).resolve()) \
        if settings.curve_secret_key_file else ""
    settings = replace(settings, curve_secret_key_file=key_file)
    if not settings.listen:
        return settings
    url = urlsplit(settings.listen)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "tcp" or not url.hostname or not port or url.path or url.query:
        raise Problem("supervisor.listen", f"expected tcp://HOST:PORT, got {settings.listen!r}")
    if not key_file:
        raise Problem("supervisor.curve_secret_key_file",
                      "required with supervisor.listen: plain tcp is refused, the endpoint needs CURVE "
                      "(lmxctl keys new server, then name server.key_secret here)")
    try:
        keys.load_secret(key_file)
    except keys.KeyFileError as exc:
        raise Problem("supervisor.curve_secret_key_file", str(exc)) from None
    return settings
