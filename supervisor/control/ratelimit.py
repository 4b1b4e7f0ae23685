"""Log lines a peer can cause at will (bad frames, strangers, denied ops) go through a limit, so a
flood costs the peer its effort and the disk nothing: a burst, then a steady trickle, and the next
line that passes says how many were suppressed."""

from __future__ import annotations

import time
from typing import Any, Callable


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
