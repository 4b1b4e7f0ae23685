"""Why a worker died: exit status, what it printed last, and what the supervisor saw, -> one code."""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from protocol.errors import ErrorCode
from protocol.exitcodes import WorkerExit

PEER_LOST = "group_peer_lost"
# Lines a dying worker prints, most specific first. (pattern, code, cause, victim)
PATTERNS: tuple[tuple[re.Pattern[str], ErrorCode, str, bool], ...] = tuple(
    (re.compile(p), code, cause, victim)
    for p, code, cause, victim in (
        (r"kIOGPUCommandBufferCallbackErrorOutOfMemory", ErrorCode.WORKER_OOM, "metal_out_of_memory", False),
        (r"kIOGPUCommandBufferCallbackErrorInnocentVictim", ErrorCode.WORKER_CRASHED, "metal_innocent_victim", True),
        (r"kIOGPUCommandBufferCallbackErrorImpactingInteractivity", ErrorCode.WORKER_CRASHED,
         "metal_impacting_interactivity", False),
        (r"kIOGPUCommandBufferCallbackErrorPageFault", ErrorCode.WORKER_CRASHED, "metal_page_fault", False),
        (r"kIOGPUCommandBufferCallbackErrorTimeout", ErrorCode.WORKER_CRASHED, "metal_timeout", False),
        (r"\[metal::malloc\] Resource limit .* exceeded", ErrorCode.WORKER_OOM, "metal_resource_limit", False),
        (r"std::bad_alloc", ErrorCode.WORKER_OOM, "bad_alloc", False),
        (r"\bMemoryError\b", ErrorCode.WORKER_OOM, "python_memory_error", False),
        # numpy's OpenBLAS under an address-space limit exits 1 with this, before mlx even loads.
        (r"OpenBLAS error: Memory allocation still failed", ErrorCode.WORKER_OOM, "openblas_alloc", False),
        (r"Cannot allocate memory", ErrorCode.WORKER_OOM, "enomem", False),
        # A group's rank whose collective lost a peer (mx.distributed's ring): the peer's death is
        # the cause, and the group waits a moment for it (supervisor.workers.group).
        (r"\[ring\] connection to a peer was lost|\[ring\] Couldn't connect", ErrorCode.WORKER_CRASHED,
         PEER_LOST, False),
    )
)
# A death with the last reported memory this close to the limit is taken as OOM.
NEAR_LIMIT = 0.9
# A worker's own log lines carry their time; one older than this before the death is not its last
# words: a MemoryError a request hit (and the worker survived) an hour ago must not relabel a
# SIGKILL now as WORKER_OOM. Plain lines (a C++ abort, a traceback) have no time and are what a
# dying process prints last, so they always count.
LAST_WORDS_S = 10.0


@dataclass(frozen=True)
class Verdict:
    code: ErrorCode
    cause: str
    victim: bool = False  # collateral damage of another process's fault: not held against the model
    details: dict[str, Any] = field(default_factory=dict)

    def message(self, pid: int | None) -> str:
        how = self.details.get("signal") or f"exit code {self.details.get('exit_code')}"
        return f"worker pid {pid} died ({how}): {self.cause}"


def exit_details(returncode: int | None) -> dict[str, Any]:
    if returncode is None:  # an adopted worker is not our child: its exit status cannot be read
        return {"signal": None, "exit_code": None}
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name, "exit_code": None}
        except ValueError:
            return {"signal": f"signal {-returncode}", "exit_code": None}
    return {"signal": None, "exit_code": returncode}


def last_words(lines: Iterable[str], died_at: float) -> list[str]:
    """The lines that can explain a death at `died_at` (wall clock): see LAST_WORDS_S."""
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                ts = json.loads(line).get("ts")
            except (ValueError, AttributeError):
                ts = None
            if isinstance(ts, (int, float)) and ts < died_at - LAST_WORDS_S:
                continue
        out.append(line)
    return out


def classify(
    returncode: int | None,
    stderr_tail: Iterable[str],
    *,
    killed_for: tuple[ErrorCode, str] | None = None,
    last_memory: dict[str, int] | None = None,
    memory_limit_bytes: int = 0,
    died_at: float | None = None,
) -> Verdict:
    """Pure given `died_at` (the wall-clock time of the death; now when omitted): the same inputs
    always give the same verdict (tests feed it the real strings)."""
    details = exit_details(returncode)
    if killed_for is not None:  # the supervisor itself killed it (hung, over its memory limit)
        return Verdict(killed_for[0], killed_for[1], details=details)
    lines = last_words(stderr_tail, time.time() if died_at is None else died_at)
    for pattern, code, cause, victim in PATTERNS:
        hit = next((line for line in reversed(lines) if pattern.search(line)), None)
        if hit is not None:
            return Verdict(code, cause, victim, {**details, "evidence": hit[-300:]})
    if memory_limit_bytes and last_memory:
        used = max(last_memory.get("rss_bytes", 0), last_memory.get("mlx_active_bytes", 0))
        if used >= NEAR_LIMIT * memory_limit_bytes:
            return Verdict(ErrorCode.WORKER_OOM, "near_memory_limit", details={**details, "used_bytes": used})
    if returncode == WorkerExit.LOAD_FAILED:
        return Verdict(ErrorCode.LOAD_FAILED, "load_failed", details=details)
    if returncode is None:
        return Verdict(ErrorCode.WORKER_CRASHED, "adopted worker exited (status unknown)", details=details)
    if returncode < 0:
        return Verdict(ErrorCode.WORKER_CRASHED, f"killed by {details['signal']}", details=details)
    return Verdict(ErrorCode.WORKER_CRASHED, f"unexpected exit {returncode}", details=details)
