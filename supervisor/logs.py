"""Structured JSON logs: one object per line to stderr and to a size-rotated file in the state dir,
with secret values redacted before anything is rendered; and the limit on log lines a peer can cause."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any, Callable

import structlog

LOG_FILE = "supervisor.log"
DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_BACKUPS = 5

# Exact key names, compared case-insensitively. Never substrings: matching "token" once hid
# max_tokens, prompt_tokens and tokens_per_s, the very numbers an operator reads the log for.
SECRET_KEYS = frozenset({
    "token", "secret", "password", "api_key", "authorization", "secret_key", "curve_secret_key",
    "private_key", "hf_token",
})
REDACTED = "[redacted]"


def _redact(value: Any) -> Any:
    # New containers, never edits in place: the dicts logged are often the caller's own state.
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and k.lower() in SECRET_KEYS else _redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the value of every secret key, at any depth, becomes "[redacted]"."""
    return _redact(event_dict)


def configure(state_dir: Path | None, level: str = "info", max_bytes: int = DEFAULT_MAX_BYTES,
              backups: int = DEFAULT_BACKUPS, stderr_level: str = "debug") -> None:
    """Route structlog through one JSON renderer to stderr and (when given) the state dir's log,
    which rotates at `max_bytes` and keeps `backups` old files (supervisor.log.1 is the newest).
    `stderr_level` trims what stderr gets ("off": nothing), for a service manager that writes
    stderr to a file nobody rotates; the state dir's log always gets everything at `level`."""
    handlers: list[logging.Handler] = []
    if stderr_level != "off" or state_dir is None:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(stderr_level.upper() if stderr_level != "off" else "DEBUG")
        handlers.append(stream)
    if state_dir is not None:
        log_dir = state_dir / "logs"
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            log_dir / LOG_FILE, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"))
    root = logging.getLogger("lmx")
    for old in root.handlers:
        old.close()
    root.handlers.clear()
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(level.upper())
    root.propagate = False
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> Any:
    return structlog.get_logger("lmx").bind(**bound)


WORKER_LOGS_KEPT = 10  # per model, of workers that are gone


def prune_worker_logs(log_dir: Path, keep: int = WORKER_LOGS_KEPT) -> list[str]:
    """Each worker writes `worker-<model>-<pid>.log` (it outlives its supervisor, so the supervisor
    cannot rotate it). At start, keep the newest `keep` of each model's dead workers; a live worker's
    log (one to adopt) is never touched. Returns the names removed."""
    import psutil

    by_model: dict[str, list[Path]] = {}
    for path in log_dir.glob("worker-*-*.log"):
        model, _, pid = path.stem[len("worker-"):].rpartition("-")
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        by_model.setdefault(model, []).append(path)
    removed = []
    for paths in by_model.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for path in paths[keep:]:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# Log lines a peer can cause at will (bad frames, strangers, denied ops) go through a limit, so a
# flood costs the peer its effort and the disk nothing: a burst, then a steady trickle, and the next
# line that passes says how many were suppressed.
class LogLimit:
    """A token bucket per event name: `burst` lines at once, then `per_s` lines a second."""

    def __init__(self, logger: Any, burst: int = 20, per_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.burst, self.per_s, self._clock = logger, burst, per_s, clock
        self._tokens: dict[str, float] = {}
        self._at: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, event: str) -> int | None:
        """None: drop this line. Else the number of lines suppressed since the last one passed."""
        now = self._clock()
        tokens = min(self.burst, self._tokens.get(event, self.burst) + (now - self._at.get(event, now)) * self.per_s)
        self._at[event] = now
        if tokens < 1:
            self._tokens[event] = tokens
            self.suppressed[event] = self.suppressed.get(event, 0) + 1
            return None
        self._tokens[event] = tokens - 1
        return self.suppressed.pop(event, 0)

    def log(self, level: str, event: str, **fields: Any) -> bool:
        """Log at `level` if the limit allows, with `suppressed=N` when lines were dropped before."""
        dropped = self.allow(event)
        if dropped is None:
            return False
        if dropped:
            fields["suppressed"] = dropped
        getattr(self.logger, level)(event, **fields)
        return True
