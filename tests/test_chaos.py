"""Chaos with real workers and real mlx-lm; every fault comes from outside the production code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import REPO, RunningSupervisor, process_gone, wait_until, workers_of

METAL_OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")
METAL_VICTIM = ("[METAL] Command buffer execution failed: Caused GPU Timeout Error "
                "(00000002:kIOGPUCommandBufferCallbackErrorInnocentVictim)")


def chaos(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.chaos_worker", *args]


# One supervisor serves every death case below: a model per fault, each a real worker killed by its
# real signal (or line then signal), and `good` beside them all. A case only touches its own model,
# so one that fails leaves the others' models as they were.
GENERATION_FAULTS = {
    "metal-oom": (["--say", METAL_OOM, "--signal", "SIGABRT"], "WORKER_OOM", "metal_out_of_memory", False),
    "innocent-victim": (["--say", METAL_VICTIM, "--signal", "SIGABRT"], "WORKER_CRASHED", "metal_innocent_victim",
                        True),
    "bad-alloc": (["--say", "terminate called after throwing an instance of 'std::bad_alloc'"], "WORKER_OOM",
                  "bad_alloc", False),
    "sigsegv": (["--signal", "SIGSEGV"], "WORKER_CRASHED", "killed by SIGSEGV", False),
    "sigbus": (["--signal", "SIGBUS"], "WORKER_CRASHED", "killed by SIGBUS", False),
}
LOAD_SIGNALS = ["SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    models = [{"id": f"gen-{name}", "path": str(tiny_model), "worker_command": chaos("--at", "generate", *fault)}
              for name, (fault, *_) in GENERATION_FAULTS.items()]
    models += [{"id": f"load-{sig}", "path": str(tiny_model), "worker_command": chaos("--at", "load", "--signal", sig)}
               for sig in LOAD_SIGNALS]
    models.append({"id": "good", "path": str(tiny_model)})
    # One failure quarantines: a load death stays one record, and a generation death is not retried
    # behind the other cases' backs (the victim, not counted, restarts; its case waits that out).
    sup = RunningSupervisor(tmp_path_factory.mktemp("chaos"), models, restart={"quarantine_after": 1})
    try:
        yield sup.start(wait_ready=False)
    finally:
        sup.cleanup()


@pytest.mark.timeout(240)  # the first case's setup starts all ten workers
@pytest.mark.parametrize("name", list(GENERATION_FAULTS))
def test_deaths_during_generation_reach_the_client_classified(faulty: RunningSupervisor, name: str) -> None:
    fault, code, cause, victim = GENERATION_FAULTS[name]
    bad = f"gen-{name}"
    # Ten workers start at once on a busy machine: the first case waits the longest.
    pid = faulty.wait_model(bad, lambda m: m["state"] == "READY", 120, "READY")["worker_pid"]
    faulty.wait_model("good", lambda m: m["state"] == "READY", 120, "READY")
    with pytest.raises(E.LmxError) as info:
        faulty.client.complete(bad, "Hello", max_tokens=50)
    assert info.value.code.code == code and info.value.details["cause"] == cause
    assert faulty.client.complete("good", "Hello", max_tokens=3).usage["completion_tokens"] >= 1
    record = faulty.client.history(bad)[0]
    assert (record["code"], record["cause"], record["victim"], record["phase"]) == (code, cause, victim, "READY")
    assert record["request_id"] and record["stderr_tail"] and record["worker_pid"] == pid
    # Counted (or not) before the client heard; the restart after it is in-process.
    assert faulty.model(bad)["failures_in_window"] == (0 if victim else 1)  # a victim is not held against it
    # Left settled for whoever reads the supervisor next: quarantined, or (a victim) serving again.
    faulty.wait_model(bad, lambda m: m["state"] == ("READY" if victim else "QUARANTINED") and m["worker_pid"] != pid,
                      60, "settled after the death")


@pytest.mark.timeout(240)  # run alone (-k), its first case's setup starts all ten workers
@pytest.mark.parametrize("sig", LOAD_SIGNALS)
def test_deaths_during_load_are_classified_and_the_other_model_keeps_serving(faulty: RunningSupervisor,
                                                                            sig: str) -> None:
    faulty.wait_model(f"load-{sig}", lambda m: m["state"] == "QUARANTINED", 120, "QUARANTINED")
    faulty.wait_model("good", lambda m: m["state"] == "READY", 120, "READY")
    (record,) = faulty.client.history(f"load-{sig}")
    assert (record["code"], record["signal"], record["phase"]) == ("WORKER_CRASHED", sig, "LOADING")
    assert faulty.client.complete("good", "Hello", max_tokens=3).usage["completion_tokens"] >= 1


def test_a_model_that_crashes_on_every_start_is_quarantined_after_exactly_n_and_stays_so(
    make_supervisor, tiny_model: Path
) -> None:
    # The release that follows a quarantine is in-process (test_lifecycle_inprocess_failures::
    # test_a_release_forgets_the_failures_and_reads_every_file_again) and over the wire in
    # test_registry_evidence and test_memory_admission: here, real SIGSEGVs and a real SIGKILL.
    sup = make_supervisor(
        [{"id": "flappy", "path": str(tiny_model), "worker_command": chaos("--at", "load", "--signal", "SIGSEGV")}],
        restart={"quarantine_after": 2, "backoff_initial_s": 0.05},
    ).start(wait_ready=False)
    m = sup.wait_model("flappy", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    assert m["failures_in_window"] == 2 and m["restarts"] == 2
    assert len([e for e in sup.events("worker.spawned") if e["model"] == "flappy"]) == 2
    history = sup.client.history("flappy")
    assert [r["code"] for r in history] == ["WORKER_CRASHED"] * 2
    assert {r["signal"] for r in history} == {"SIGSEGV"} and {r["phase"] for r in history} == {"LOADING"}
    with pytest.raises(E.ModelQuarantined) as info:
        sup.client.complete("flappy", "Hello", max_tokens=2)
    assert info.value.details["failures"] == 2 and info.value.details["last_code"] == "WORKER_CRASHED"
    assert not info.value.retryable

    # launchd restarts a SIGKILLed supervisor: the quarantine and the counts are still there.
    sup.proc.kill()
    sup.proc.wait()
    sup.start(wait_ready=False)
    # Autoload runs in the step that logs supervisor.started: once status answers after it, the
    # restarted supervisor has decided about the model.
    wait_until(lambda: len(sup.events("supervisor.started")) == 2, 30, "the second boot")
    m = sup.model("flappy")
    assert m["state"] == "QUARANTINED" and m["failures_in_window"] == 2
    assert len(sup.client.history("flappy")) == 2
    with pytest.raises(E.ModelQuarantined):
        sup.client.complete("flappy", "Hello", max_tokens=2)


def test_a_broken_new_revision_rolls_back_to_last_known_good(make_supervisor, tiny_model: Path) -> None:
    good = {"id": "m", "path": str(tiny_model)}
    # One failure reaches the threshold: the rollback decision after n of them is in-process
    # (test_lifecycle_inprocess_failures::test_a_revision_that_keeps_failing_rolls_back_to_the_last_known_good).
    restart = {"quarantine_after": 1, "backoff_initial_s": 0.05, "stable_after_s": 0.3}
    sup = make_supervisor([good], restart=restart).start()
    v1 = sup.wait_model("m", lambda m: m["lkg_revision"] == m["revision"], 10, "v1 last-known-good")["revision"]
    sup.rewrite([{**good, "worker_command": chaos("--at", "load", "--signal", "SIGABRT")}], restart=restart)
    assert sup.client.reload()["changed"] == ["m"]
    m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["revision"] == v1 and m["restarts"] == 1,
                       60, "READY again on v1")
    assert m["configured_revision"] != v1 and m["lkg_revision"] == v1
    states = [(e["from"], e["to"]) for e in sup.events("model.state") if e["model"] == "m"]
    assert ("BACKOFF", "ROLLING_BACK") in states and ("ROLLING_BACK", "STARTING") in states
    assert sup.client.complete("m", "Hello", max_tokens=2).usage["completion_tokens"] >= 1
    # By hand: an operator moves it to a known revision (here the same v1, on a fresh worker).
    pid = m["worker_pid"]
    assert sup.client.rollback("m", v1)["revision"] == v1
    m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "READY by hand")
    assert m["revision"] == v1
    with pytest.raises(E.BadRequest):
        sup.client.rollback("m", "000000000000")


def test_a_stopped_worker_is_hung_killed_and_restarted(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}],
                          supervisor={"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5}).start()
    pid = sup.model("m")["worker_pid"]

    async def stream_then_stop() -> tuple[E.LmxError, float]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            t0 = None
            try:
                async for _ in client.generate("m", "Hello", max_tokens=1500):
                    if t0 is None:
                        os.kill(pid, signal.SIGSTOP)
                        t0 = time.monotonic()
            except E.LmxError as exc:
                return exc, time.monotonic() - t0
        raise AssertionError("no error")

    exc, waited = asyncio.run(stream_then_stop())
    assert isinstance(exc, E.WorkerHung) and exc.details["signal"] == "SIGKILL"
    assert 1.4 <= waited < 5.0
    wait_until(lambda: process_gone(pid), 10, "the hung worker killed")
    # Stored before the client heard (test_durable_failures); the restart after it is in-process.
    assert sup.client.history("m")[0]["code"] == "WORKER_HUNG"


def test_a_memory_limit_below_what_the_model_needs_is_a_real_oom(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "small", "path": str(tiny_model), "memory_limit_bytes": 300_000_000}],
                          restart={"quarantine_after": 2, "backoff_initial_s": 0.05}).start(wait_ready=False)
    m = sup.wait_model("small", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    records = sup.client.history("small")
    assert {r["code"] for r in records} == {"WORKER_OOM"}, records
    assert m["last_error"]["code"] == "MODEL_QUARANTINED"


def test_a_supervisor_sigkilled_mid_stream_adopts_its_workers_without_a_reload(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}],
                          supervisor={"orphan_grace_s": 60.0}).start()
    pids = {m["id"]: m["worker_pid"] for m in sup.status()["models"]}

    async def stream_while_supervisor_dies() -> Exception:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            try:
                async for _ in client.generate("a", "Hello", max_tokens=1500):
                    sup.proc.kill()
            except E.LmxError as exc:
                return exc
        raise AssertionError("no error")

    assert isinstance(asyncio.run(stream_while_supervisor_dies()), E.SupervisorUnavailable)
    sup.proc.wait()
    sup.start()
    assert {m["id"]: m["worker_pid"] for m in sup.status()["models"]} == pids
    assert workers_of(sup.state_dir) == set(pids.values())  # no duplicates
    for model, pid in pids.items():
        log = (sup.state_dir / "logs" / f"worker-{model}-{pid}.log").read_text()
        assert log.count('"worker.loaded"') == 1 and '"worker.adopted"' in log
    adopted = [e for e in sup.events("model.state") if e["to"] == "CANARY" and "adopted" in e["reason"]]
    assert {e["model"] for e in adopted} == {"a", "b"}
    for model in pids:
        assert sup.client.complete(model, "Hello", max_tokens=3).usage["completion_tokens"] >= 1


def test_a_supervisor_restarted_after_the_grace_window_reloads(make_supervisor, tiny_model: Path) -> None:

    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}], supervisor={"orphan_grace_s": 1.0}).start()
    pid = sup.model("a")["worker_pid"]
    sup.proc.kill()
    sup.proc.wait()
    wait_until(lambda: process_gone(pid),
               10, "the orphan to exit")
    sup.start()
    assert sup.model("a")["worker_pid"] != pid
    assert [e for e in sup.events("worker.adoption_skipped") if e["worker_pid"] == pid]


def _lmxctl(sup, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_operators_see_and_clear_a_quarantine_with_lmxctl_and_a_config_change_clears_it_too(
    make_supervisor, tiny_model: Path
) -> None:
    crashing = {"id": "m", "path": str(tiny_model), "worker_command": chaos("--at", "load", "--signal", "SIGBUS")}
    restart = {"quarantine_after": 1, "backoff_initial_s": 0.05}  # n failures: in-process and above
    sup = make_supervisor([crashing], restart=restart).start(wait_ready=False)
    sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 30, "QUARANTINED")
    history = _lmxctl(sup, "history", "m")
    assert history.returncode == 0 and history.stdout.count("WORKER_CRASHED") == 1 and "SIGBUS" in history.stdout
    status = _lmxctl(sup, "status")
    assert "QUARANTINED" in status.stdout and "MODEL_QUARANTINED" in status.stdout
    gen = _lmxctl(sup, "generate", "m", "Hello", "--json")
    assert gen.returncode == 1 and json.loads(gen.stdout)["error"]["code"] == "MODEL_QUARANTINED"
    # The operator fixes the config (drops the crashing wrapper) and sends SIGHUP, as launchd users do.
    sup.rewrite([{k: v for k, v in crashing.items() if k != "worker_command"}], restart=restart)
    sup.proc.send_signal(signal.SIGHUP)
    m = sup.wait_model("m", lambda m: m["state"] == "READY", 30, "READY on the new revision")
    assert m["revision"] == m["configured_revision"] and not m["quarantined"]
    assert [e for e in sup.events("config.reloaded") if e["changed"] == ["m"]]


def test_a_corrupt_store_is_moved_aside_loudly_not_silently_reset(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}])
    sup.state_dir.mkdir(mode=0o700, parents=True)
    (sup.state_dir / "store.sqlite3").write_bytes(b"this is not a database" * 100)
    sup.start()
    aside = list(sup.state_dir.glob("store.sqlite3.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    (event,) = sup.events("store.corrupt_moved_aside")
    assert event["level"] == "error" and event["moved_to"] == str(aside[0])
