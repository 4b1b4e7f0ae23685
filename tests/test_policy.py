"""Restart policy: pure functions of history and config."""

from __future__ import annotations

import random

from supervisor.config import RestartSettings
from supervisor.lifecycle.policy import backoff_s


def test_backoff_doubles_with_bounded_jitter_and_caps() -> None:
    r = RestartSettings(backoff_initial_s=1.0, backoff_max_s=10.0)
    rng = random.Random(0)
    assert backoff_s(0, r, rng) == 0.0
    for n, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)]:
        got = backoff_s(n, r, rng)
        assert base <= got <= min(10.0, base * 1.2)
    assert backoff_s(10, r, rng) == 10.0


from supervisor.lifecycle.policy import Action, decide, failures_in_window  # noqa: E402
from supervisor.persistence.records import Failure  # noqa: E402

R = RestartSettings(quarantine_after=3, window_s=600.0, backoff_initial_s=1.0, backoff_max_s=60.0)


def _fails(*spec: tuple[float, str], counted: bool = True) -> list[Failure]:
    return [Failure(at, rev, "WORKER_CRASHED", counted) for at, rev in spec]


def test_window_counts_only_recent_counted_failures_of_the_revision() -> None:
    h = _fails((0, "a"), (500, "a"), (550, "b")) + _fails((560, "a"), counted=False)
    assert failures_in_window(h, 650, 600) == 2  # t=0 fell out; the victim never counts
    assert failures_in_window(h, 650, 600, "a") == 1


def test_below_the_threshold_restarts_with_backoff() -> None:
    d = decide(_fails((0, "a"), (10, "a")), 20, R, "a", None, 2, random.Random(1))
    assert d.action is Action.RESTART and 2.0 <= d.delay_s <= 2.4 and d.failures_in_window == 2


def test_exactly_quarantine_after_failures_quarantines_without_lkg() -> None:
    h = _fails((0, "a"), (10, "a"), (20, "a"))
    assert decide(h, 30, R, "a", None, 3).action is Action.QUARANTINE
    assert decide(h, 30, R, "a", "a", 3).action is Action.QUARANTINE  # LKG is the failing one


def test_a_broken_new_revision_rolls_back_to_a_different_lkg() -> None:
    d = decide(_fails((0, "new"), (10, "new"), (20, "new")), 30, R, "new", "old", 3)
    assert d.action is Action.ROLLBACK and d.revision == "old"


def test_lkg_failing_the_same_way_quarantines() -> None:
    h = _fails((0, "new"), (10, "new"), (20, "new"), (30, "old"), (40, "old"), (50, "old"))
    assert decide(h, 60, R, "old", "old", 3).action is Action.QUARANTINE
    assert decide(h, 60, R, "new", "old", 3).action is Action.QUARANTINE


def test_failures_outside_the_window_do_not_quarantine() -> None:
    h = _fails((0, "a"), (10, "a"), (700, "a"))
    assert decide(h, 700, R, "a", None, 1).action is Action.RESTART
