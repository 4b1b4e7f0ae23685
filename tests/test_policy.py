"""Restart policy: pure functions of history and config."""

from __future__ import annotations

import random

from supervisor.config import RestartSettings
from supervisor.policy import backoff_s


def test_backoff_doubles_with_bounded_jitter_and_caps() -> None:
    r = RestartSettings(backoff_initial_s=1.0, backoff_max_s=10.0)
    rng = random.Random(0)
    assert backoff_s(0, r, rng) == 0.0
    for n, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)]:
        got = backoff_s(n, r, rng)
        assert base <= got <= min(10.0, base * 1.2)
    assert backoff_s(10, r, rng) == 10.0
