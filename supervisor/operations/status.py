"""The status record: the supervisor process's own figures, read at most once a second, beside each
model's typed ModelStatus."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

import supervisor
from supervisor.services import Services


class ProcessFigures:
    """What status says of the supervisor itself (pid, memory, uptime, the state dir, safe mode)."""

    def __init__(self, state_dir: Path, safe_mode: bool) -> None:
        self.state_dir = state_dir
        self.safe_mode = safe_mode
        self.started = time.monotonic()
        self._proc = psutil.Process()
        self._rss = (0.0, 0)  # (monotonic time read, bytes): status reads /proc at most once a second

    def _rss_bytes(self) -> int:
        now = time.monotonic()
        if now - self._rss[0] >= 1.0:
            self._rss = (now, self._proc.memory_info().rss)
        return self._rss[1]

    def supervisor(self, services: Services, draining: bool) -> dict[str, Any]:
        ledger, spares = services.ledger, services.spares
        return {
            "pid": os.getpid(),
            "version": supervisor.__version__,
            "rss_bytes": self._rss_bytes(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            # The point of the process split: mlx lives only in workers.
            "mlx_imported": "mlx" in sys.modules or "mlx_lm" in sys.modules,  # any submodule imports these
            "state_dir": str(self.state_dir),
            "config": services.config.source,
            "draining": draining,
            "safe_mode": self.safe_mode,
            **services.store.health(),
            "memory_budget_bytes": ledger.budget,
            "memory_reserved_bytes": sum(ledger.held.values()),
            "memory_stranded_bytes": ledger.stranded_bytes(),
            "memory_stranded": list(ledger.stranded.values()),
            "warm_spares": {"configured": spares.size, "ready": spares.ready} if spares else None,
        }
