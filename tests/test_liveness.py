"""Liveness verdicts from plain data: heartbeats, stall budgets per phase, the memory limit."""

from __future__ import annotations

from protocol.errors import ErrorCode
from supervisor.config import SupervisorSettings
from supervisor.workers.liveness import liveness_verdict

SUP = SupervisorSettings(heartbeat_timeout_s=5.0, decode_stall_s=60.0, prefill_stall_s=120.0)


def verdict(now: float = 100.0, last_hb: float = 99.0, phase: str = "idle", progress_at: float = 0.0,
            memory: dict | None = None, limit: int = 0):
    return liveness_verdict(SUP, now, last_hb, phase, progress_at, memory or {}, limit)


def test_healthy_idle_worker_has_no_verdict_however_long_it_idles() -> None:
    assert verdict(phase="idle", progress_at=0.0) is None


def test_silence_is_hung() -> None:
    code, why = verdict(now=100.0, last_hb=94.0)
    assert code is ErrorCode.WORKER_HUNG and "no heartbeat" in why


def test_prefill_and_decode_have_separate_stall_budgets() -> None:
    assert verdict(phase="prefill", progress_at=100.0 - 90) is None  # a long prompt is not a wedge
    assert verdict(phase="decode", progress_at=100.0 - 90)[0] is ErrorCode.WORKER_HUNG
    assert verdict(phase="prefill", progress_at=100.0 - 130)[0] is ErrorCode.WORKER_HUNG


def test_memory_over_the_limit_is_oom() -> None:
    assert verdict(memory={"rss_bytes": 900}, limit=1000) is None
    assert verdict(memory={"mlx_active_bytes": 1100}, limit=1000)[0] is ErrorCode.WORKER_OOM
    assert verdict(memory={"rss_bytes": 10**12}, limit=0) is None  # no limit configured
