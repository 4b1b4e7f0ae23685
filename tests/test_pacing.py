"""When a stream's chunks go on the wire (worker.pacing): pure logic, times given by the test."""

from __future__ import annotations

from worker.pacing import Pacer


def test_the_first_chunk_is_never_held() -> None:
    assert not Pacer(0.01).hold(now=0.0, step_s=0.001)


def test_chunks_within_the_interval_wait_for_the_next_step() -> None:
    p = Pacer(0.01)
    p.sent(1.000)
    assert p.hold(now=1.001, step_s=0.001)
    assert p.hold(now=1.008, step_s=0.001)
    assert not p.hold(now=1.0095, step_s=0.001)  # the next step would end past the interval
    assert not p.hold(now=1.011, step_s=0.001)


def test_a_long_next_step_never_holds_a_chunk_back() -> None:
    p = Pacer(0.01)
    p.sent(1.000)
    # A prefill slice or a slow model: waiting for that step would delay these tokens past the interval.
    assert not p.hold(now=1.001, step_s=0.2)


def test_an_interval_of_zero_sends_every_step() -> None:
    p = Pacer(0.0)
    p.sent(1.0)
    assert not p.hold(now=1.0, step_s=0.0)
