"""Structured JSON logs: one object per line to stderr and to a file in the state dir."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import structlog

LOG_FILE = "supervisor.log"


def configure(state_dir: Path | None, level: str = "info") -> None:
    """Route structlog through one JSON renderer to stderr and (when given) the state dir's log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if state_dir is not None:
        log_dir = state_dir / "logs"
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(log_dir / LOG_FILE, maxBytes=20_000_000, backupCount=5)
        )
    root = logging.getLogger("lmx")
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
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> Any:
    return structlog.get_logger("lmx").bind(**bound)
