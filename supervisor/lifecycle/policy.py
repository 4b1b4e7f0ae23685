"""Restart policy as pure functions of (history, now, config) -> decision. No clocks, no IO."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from supervisor.config import RestartSettings
from supervisor.persistence.records import Failure  # the ledger's entry, kept by the store


class Action(enum.Enum):
    RESTART = "restart"
    ROLLBACK = "rollback"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    revision: str | None = None  # ROLLBACK: the revision to run
    failures_in_window: int = 0


def backoff_s(consecutive_failures: int, restart: RestartSettings, rng: random.Random | None = None) -> float:
    """Exponential from backoff_initial_s, capped at backoff_max_s, with up to 20% jitter so that
    several models failing together do not restart in lockstep."""
    if consecutive_failures <= 0:
        return 0.0
    base = min(restart.backoff_max_s, restart.backoff_initial_s * 2 ** (consecutive_failures - 1))
    jitter = (rng or random).uniform(0.0, 0.2) * base
    return min(restart.backoff_max_s, base + jitter)


def failures_in_window(history: list[Failure], now: float, window_s: float, revision: str | None = None) -> int:
    return sum(1 for f in history
               if f.counted and now - f.at <= window_s and (revision is None or f.revision == revision))


def decide(
    history: list[Failure],
    now: float,
    restart: RestartSettings,
    running_revision: str,
    lkg_revision: str | None,
    consecutive_failures: int,
    rng: random.Random | None = None,
) -> Decision:
    """After a failure (already in `history`): restart with backoff, roll back, or quarantine.
    A revision that reached quarantine_after failures in the window rolls back to a different
    last-known-good when there is one; else (or when the LKG itself fails so) quarantine."""
    count = failures_in_window(history, now, restart.window_s, running_revision)
    if count < restart.quarantine_after:
        return Decision(Action.RESTART, backoff_s(consecutive_failures, restart, rng), failures_in_window=count)
    if lkg_revision is not None and lkg_revision != running_revision:
        lkg_count = failures_in_window(history, now, restart.window_s, lkg_revision)
        if lkg_count < restart.quarantine_after:
            return Decision(Action.ROLLBACK, 0.0, lkg_revision, count)
    return Decision(Action.QUARANTINE, failures_in_window=count)
