"""Is a live worker still doing its job? Pure verdicts from what its heartbeats said, and when."""

from __future__ import annotations

from protocol.errors import ErrorCode
from protocol.phase import Phase
from supervisor.config import SupervisorSettings


def liveness_verdict(
    sup: SupervisorSettings,
    now: float,
    last_heartbeat: float,
    phase: str,
    progress_at: float,
    memory: dict,
    memory_limit_bytes: int,
) -> tuple[ErrorCode, str] | None:
    """None while healthy; else why to kill it. Separate stall budgets for prefill and decode, so a
    long prompt or a long answer is never mistaken for a wedge (a total-time deadline would be)."""
    silent_s = now - last_heartbeat
    if silent_s > sup.heartbeat_timeout_s and phase != Phase.JOINING:
        return ErrorCode.WORKER_HUNG, f"no heartbeat for {silent_s:.1f}s"
    stall_s = now - progress_at
    budget = {Phase.DECODE: sup.decode_stall_s, Phase.PREFILL: sup.prefill_stall_s}.get(phase)
    if budget is not None and stall_s > budget:
        return ErrorCode.WORKER_HUNG, f"no {phase} progress for {stall_s:.1f}s"
    used = max(memory.get("rss_bytes", 0), memory.get("mlx_active_bytes", 0))
    if memory_limit_bytes and used > memory_limit_bytes:
        return ErrorCode.WORKER_OOM, f"memory {used} bytes over memory_limit_bytes={memory_limit_bytes}"
    return None
