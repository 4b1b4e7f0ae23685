"""The gateway's API keys: created and revoked with `lmxctl keys api`, kept hashed in
`<state_dir>/gateway/api_keys.json` (0600), read by the gateway whenever the file changes.

A key is `lmx-<id>-<secret>`: the id (8 hex digits) finds its entry, the SHA-256 of the whole key
proves it (the secret is 32 random bytes, so a plain digest is enough: there is nothing to guess).
The file never holds a key, only its digest; `lmxctl keys api new` prints the key once.

Each key has a scope — the models it may use (none listed: all) and the endpoints (`inference`:
generations, token counts, model listings; `admin`: the gateway's metrics too) — limits (requests
and tokens per minute, requests at once) and a priority (`interactive` or `batch`)."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import structlog

log = structlog.get_logger("lmx.gateway")

FILE = "api_keys.json"
SCOPES = ("inference", "admin")
PRIORITIES = ("interactive", "batch")
_KEY = re.compile(r"lmx-([0-9a-f]{8})-[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyStoreError(ValueError):
    """A key store problem an operator can act on (bad name, duplicate, unreadable file)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    key_id: str
    digest: str
    models: tuple[str, ...] = ()          # () = every model
    scopes: tuple[str, ...] = ("inference",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrency: int | None = None
    priority: str = "interactive"
    created: float = field(default_factory=time.time)

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        del out["digest"]
        return out


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def path_in(state_dir: Path) -> Path:
    return state_dir / "gateway" / FILE


def _parse(raw: Any) -> dict[str, ApiKey]:
    if not isinstance(raw, dict) or raw.get("version") != 1 or not isinstance(raw.get("keys"), list):
        raise KeyStoreError("not an API key file (expected {version: 1, keys: [...]})")
    out = {}
    for entry in raw["keys"]:
        entry = dict(entry)
        entry["models"], entry["scopes"] = tuple(entry.get("models", ())), tuple(entry.get("scopes", ("inference",)))
        key = ApiKey(**entry)
        out[key.key_id] = key
    return out


def read(path: Path) -> dict[str, ApiKey]:
    """key_id -> key; an absent file is no keys."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        return _parse(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"{path}: {exc}") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, keys: dict[str, ApiKey]) -> None:
    tmp = path.with_name(f".{FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "keys": [asdict(k) for k in keys.values()]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create(path: Path, name: str, **settings: Any) -> tuple[ApiKey, str]:
    """A new key named `name`: its entry, and the key itself (shown once, stored nowhere)."""
    if not _NAME.fullmatch(name):
        raise KeyStoreError(f"{name[:80]!r}: a key name is 1-64 letters, digits, '.', '_' or '-'")
    for scope in settings.get("scopes", ()):
        if scope not in SCOPES:
            raise KeyStoreError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if settings.get("priority", "interactive") not in PRIORITIES:
        raise KeyStoreError(f"priority {settings['priority']!r}: expected one of {', '.join(PRIORITIES)}")
    with _locked(path):
        keys = read(path)
        if any(k.name == name for k in keys.values()):
            raise KeyStoreError(f"a key named {name!r} exists: revoke it first")
        key_id = secrets.token_hex(4)
        while key_id in keys:
            key_id = secrets.token_hex(4)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        key = f"lmx-{key_id}-{secret}"
        entry = ApiKey(name=name, key_id=key_id, digest=digest(key), **settings)
        keys[key_id] = entry
        _write(path, keys)
    return entry, key


def revoke(path: Path, name: str) -> bool:
    with _locked(path):
        keys = read(path)
        kept = {i: k for i, k in keys.items() if k.name != name}
        if len(kept) == len(keys):
            return False
        _write(path, kept)
    return True


def find(keys: dict[str, ApiKey], presented: str) -> ApiKey | None:
    m = _KEY.fullmatch(presented)
    if m is None:
        return None
    entry = keys.get(m[1])
    if entry is None or not hmac.compare_digest(entry.digest, digest(presented)):
        return None
    return entry


class KeyRing:
    """The gateway's view of the key file, read again when it changes (a stat at most every
    `check_s`), so `lmxctl keys api revoke` takes effect within that time, without a restart."""

    def __init__(self, path: Path, check_s: float = 1.0) -> None:
        self.path = path
        self._check_s = check_s
        self._seen: tuple[int, int, int] | None = None
        self._next = 0.0
        self.keys: dict[str, ApiKey] = {}
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._check_s
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and not force:
            return
        try:
            self.keys = read(self.path) if seen is not None else {}
        except KeyStoreError as exc:  # a damaged file: keep the keys we had, say so
            log.error("gateway.api_keys_unreadable", path=str(self.path), error=str(exc))
            return
        self._seen = seen

    def find(self, presented: str) -> ApiKey | None:
        self.refresh()
        return find(self.keys, presented)
