"""Death classification: the real strings a dying worker prints, and exit statuses, -> one code."""

from __future__ import annotations

import signal

import pytest

from protocol.errors import ErrorCode
from supervisor.workers.classify import classify

METAL = "[METAL] Command buffer execution failed: {} (00000008:kIOGPUCommandBufferCallbackError{})"


@pytest.mark.parametrize(
    "line, code, cause, victim",
    [
        (METAL.format("Insufficient Memory", "OutOfMemory"), ErrorCode.WORKER_OOM, "metal_out_of_memory", False),
        (METAL.format("Caused GPU Timeout Error", "InnocentVictim"), ErrorCode.WORKER_CRASHED,
         "metal_innocent_victim", True),
        (METAL.format("Impacting Interactivity", "ImpactingInteractivity"), ErrorCode.WORKER_CRASHED,
         "metal_impacting_interactivity", False),
        (METAL.format("Page Fault", "PageFault"), ErrorCode.WORKER_CRASHED, "metal_page_fault", False),
        (METAL.format("Timeout", "Timeout"), ErrorCode.WORKER_CRASHED, "metal_timeout", False),
        ("libc++abi: terminating due to uncaught exception of type std::runtime_error: [metal::malloc] "
         "Resource limit (499000) exceeded.", ErrorCode.WORKER_OOM, "metal_resource_limit", False),
        ("terminate called after throwing an instance of 'std::bad_alloc'", ErrorCode.WORKER_OOM, "bad_alloc", False),
        ("MemoryError", ErrorCode.WORKER_OOM, "python_memory_error", False),
        ("OpenBLAS error: Memory allocation still failed after 10 retries, giving up.", ErrorCode.WORKER_OOM,
         "openblas_alloc", False),
        ("OSError: [Errno 12] Cannot allocate memory", ErrorCode.WORKER_OOM, "enomem", False),
    ],
)
def test_last_words_refine_the_class(line: str, code: ErrorCode, cause: str, victim: bool) -> None:
    v = classify(-signal.SIGABRT, ["loading", line, "  what():  aborted"])
    assert (v.code, v.cause, v.victim) == (code, cause, victim)
    assert v.details["signal"] == "SIGABRT" and v.details["evidence"] == line


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGKILL])
def test_plain_signals_are_crashes_with_the_signal_name(sig: signal.Signals) -> None:
    v = classify(-sig, ["nothing special"])
    assert v.code is ErrorCode.WORKER_CRASHED and v.details == {"signal": sig.name, "exit_code": None}
    assert not v.victim


def test_exit_statuses() -> None:
    assert classify(4, []).code is ErrorCode.LOAD_FAILED
    v = classify(1, [])
    assert v.code is ErrorCode.WORKER_CRASHED and v.details["exit_code"] == 1


def test_near_the_memory_limit_is_oom_and_far_from_it_is_not() -> None:
    near = classify(-signal.SIGKILL, [], last_memory={"rss_bytes": 950}, memory_limit_bytes=1000)
    far = classify(-signal.SIGKILL, [], last_memory={"rss_bytes": 500}, memory_limit_bytes=1000)
    assert near.code is ErrorCode.WORKER_OOM and far.code is ErrorCode.WORKER_CRASHED


def test_what_the_supervisor_killed_it_for_wins() -> None:
    v = classify(-signal.SIGKILL, ["std::bad_alloc"], killed_for=(ErrorCode.WORKER_HUNG, "no heartbeat"))
    assert (v.code, v.cause) == (ErrorCode.WORKER_HUNG, "no heartbeat")


def test_a_death_reads_as_each_kind_of_worker_said_it() -> None:
    # One Death (supervisor.workers.worker) for the three messages a worker's error had: a local
    # worker's, a group's (naming rank and host), and a peer's report (its cause is the message).
    from protocol import errors as E
    from supervisor.workers.worker import Death

    verdict = classify(-signal.SIGKILL, ["std::bad_alloc"])
    local = Death.of(verdict, 41).error()
    assert isinstance(local, E.WorkerOOM) and local.message == "worker pid 41 died (SIGKILL): bad_alloc"
    assert local.details == {"worker_pid": 41, "cause": "bad_alloc", "signal": "SIGKILL", "evidence": "std::bad_alloc"}
    group = Death.of(verdict, 41, where="rank 1 on b").error()
    assert group.message == "rank 1 on b: worker pid 41 died (SIGKILL): bad_alloc"
    peer = Death.of(classify(None, []), 7, reported=True).error()
    assert peer.message == "adopted worker exited (status unknown)" and peer.details["worker_pid"] == 7
    assert Death.of(verdict, 41).victim is verdict.victim and Death.of(verdict, 41).code is verdict.code
