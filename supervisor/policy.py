"""Restart policy as pure functions of (history, now, config) -> decision. No clocks, no IO."""

from __future__ import annotations

import random

from supervisor.config import RestartSettings


def backoff_s(consecutive_failures: int, restart: RestartSettings, rng: random.Random | None = None) -> float:
    """Exponential from backoff_initial_s, capped at backoff_max_s, with up to 20% jitter so that
    several models failing together do not restart in lockstep."""
    if consecutive_failures <= 0:
        return 0.0
    base = min(restart.backoff_max_s, restart.backoff_initial_s * 2 ** (consecutive_failures - 1))
    jitter = (rng or random).uniform(0.0, 0.2) * base
    return min(restart.backoff_max_s, base + jitter)
