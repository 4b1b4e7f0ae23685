"""What the compatibility registry may learn from (only a model's own failures in LOADING or CANARY,
on two separate starts), that its verdict never takes a serving worker down, and the checks that
must not be fooled: a canary change is not corrupt weights, cached hashes do not hide bit rot, an
old MemoryError does not relabel a later death, a rollback is admitted like any start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.errors import ErrorCode
from protocol.exitcodes import WorkerExit
from protocol.messages import Final
from supervisor import logs
from supervisor.admission.evidence import about_compat, canary_key, Evidence
from supervisor.config import CanarySettings
from supervisor.persistence.records import CrashRecord
from supervisor.persistence.store import Store
from supervisor.workers.classify import classify
from tests.harness import REPO, wait_until, workers_of


def chaos(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.chaos_worker", *args]


def _record(phase: str, code: str, signal_name: str | None = None, victim: bool = False, pid: int = 1) -> CrashRecord:
    return CrashRecord("m", "r", 0.0, code, phase=phase, signal=signal_name, victim=victim, worker_pid=pid)


@pytest.mark.parametrize("record, counts", [
    (_record("LOADING", "LOAD_FAILED"), True),
    (_record("CANARY", "CANARY_FAILED"), True),
    (_record("LOADING", "WORKER_CRASHED", "SIGABRT"), True),
    (_record("CANARY", "WORKER_CRASHED", "SIGSEGV"), True),
    (_record("READY", "WORKER_CRASHED", "SIGSEGV"), False),  # serving: requests, neighbours, operators
    (_record("LOADING", "WORKER_CRASHED", "SIGKILL"), False),  # someone else's signal
    (_record("LOADING", "WORKER_CRASHED", "SIGTERM"), False),
    (_record("CANARY", "WORKER_HUNG", "SIGKILL"), False),  # a SIGSTOP from outside ends as a hang
    (_record("LOADING", "WORKER_OOM", "SIGABRT"), False),
    (_record("LOADING", "LOAD_TIMEOUT"), False),
    (_record("CANARY", "CANARY_TIMEOUT"), False),
    (_record("LOADING", "WORKER_CRASHED", "SIGABRT", victim=True), False),
    (_record("STARTING", "WORKER_CRASHED"), False),  # exit 1 before loading: our bug, not the model's
    (_record("LOADING", "WORKER_CRASHED"), False),
])
def test_only_a_models_own_failures_while_loading_or_in_canary_are_evidence(record: CrashRecord, counts: bool) -> None:
    assert about_compat(record) is counts


def test_the_verdict_needs_two_separate_starts_and_a_pass_starts_the_count_again(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    logs.configure(None)
    ev = Evidence(Store(tmp_path), "m", str(tiny_model), None)
    assert ev.failure(_record("READY", "WORKER_CRASHED", "SIGSEGV", pid=1)) is False
    assert ev.row() is None  # learnt nothing at all
    ev.failure(_record("LOADING", "LOAD_FAILED", pid=2))
    assert ev.row()["outcome"] != "failed" and ev.known_bad() is None
    ev.canary_passed(CanarySettings(), Final("r", "hi", "stop", {"completion_tokens": 1}, {}), 0.1, {})
    ev.failure(_record("LOADING", "LOAD_FAILED", pid=3))
    assert ev.row()["outcome"] == "verified"  # one failure since the pass
    ev.failure(_record("CANARY", "WORKER_CRASHED", "SIGABRT", pid=4))
    assert ev.row()["outcome"] == "failed" and ev.known_bad() is not None
    assert ev.row()["evidence"]["crashes"] == {"LOAD_FAILED": 2, "WORKER_CRASHED": 1}


def test_the_canary_reference_is_per_request_not_per_prompt(tmp_path: Path, tiny_model: Path) -> None:
    logs.configure(None)
    ev = Evidence(Store(tmp_path), "m", str(tiny_model), None)
    four, eight = CanarySettings(prompt="p", max_tokens=4), CanarySettings(prompt="p", max_tokens=8)
    assert canary_key(four) != canary_key(eight)
    assert canary_key(four) == canary_key(CanarySettings(prompt="p", max_tokens=4, expect="x", timeout_s=1.0))
    ev.canary_passed(four, Final("r", "a b c d", "length", {"completion_tokens": 4}, {}), 0.1, {})
    out = ev.canary_passed(eight, Final("r", "a b c d e f g h", "length", {"completion_tokens": 8}, {}), 0.1, {})
    assert out["drift"] is False


def test_an_old_memory_error_in_the_tail_does_not_relabel_a_later_death() -> None:
    died_at = 10_000.0
    handled = json.dumps({"ts": died_at - 3600, "level": "error", "event": "worker.generate_failed",
                          "error": "MemoryError()"})
    v = classify(-signal.SIGKILL, [handled, '{"ts": 9999.5, "event": "worker.x"}'], died_at=died_at)
    assert (v.code, v.cause) == (ErrorCode.WORKER_CRASHED, "killed by SIGKILL")
    recent = json.dumps({"ts": died_at - 1, "level": "error", "event": "worker.load_failed", "error": "MemoryError()"})
    assert classify(4, [recent], died_at=died_at).code is ErrorCode.WORKER_OOM
    assert classify(-signal.SIGABRT, ["MemoryError"], died_at=died_at).code is ErrorCode.WORKER_OOM  # plain words


def test_a_sibling_killed_from_outside_poisons_nothing_and_a_verdict_never_ends_a_serving_worker(
    make_supervisor, tiny_model: Path
) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}],
                          supervisor={"orphan_grace_s": 60.0, "heartbeat_timeout_s": 2.0},
                          restart={"quarantine_after": 3}).start()
    for n, sig in enumerate((signal.SIGSEGV, signal.SIGSTOP, signal.SIGABRT)):
        pid = sup.wait_model("a", lambda m: m["state"] == "READY" and m["restarts"] == n, 60, "READY")["worker_pid"]
        os.kill(pid, sig)
    sup.wait_model("a", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    rows = sup.client.compat()["rows"]
    assert rows and all(r["outcome"] == "verified" and not r["evidence"].get("crashes") for r in rows)
    b_pid = sup.model("b")["worker_pid"]
    sup.proc.kill()
    sup.proc.wait()
    # Even a registry that does say "failed" for this stack (from evidence of before) must not
    # take down the serving sibling: adoption comes first.
    store = Store(sup.state_dir)
    ev = Evidence(store, "b", str(tiny_model), None)
    store.compat_record(ev.fingerprint, ev.backend, "b", "failed", {"crashes": {"LOAD_FAILED": 2}})
    store.close()
    sup.start(wait_ready=False)
    b = sup.wait_model("b", lambda m: m["state"] == "READY", 60, "b adopted")
    assert b["worker_pid"] == b_pid and sup.model("a")["state"] == "QUARANTINED"
    assert workers_of(sup.state_dir) == {b_pid}


def test_a_changed_canary_is_a_new_reference_not_corrupt_weights(make_supervisor, tiny_model: Path) -> None:
    model = {"id": "m", "path": str(tiny_model), "canary": {"prompt": "Hi", "max_tokens": 4}}
    sup = make_supervisor([model], restart={"quarantine_after": 1}).start()
    sup.rewrite([{**model, "canary": {"prompt": "Hi", "max_tokens": 8}}], restart={"quarantine_after": 1})
    assert sup.client.reload()["changed"] == ["m"]
    m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["canary"]["tokens"] == 8, 60, "READY, 8 tokens")
    assert m["restarts"] == 0 and sup.client.history("m") == []
    assert all(r["outcome"] == "verified" for r in sup.client.compat()["rows"])


def _rot(path: Path) -> None:
    """Bit rot: same size, same inode, mtime put back; only the bytes differ."""
    st = path.stat()
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(len(data) // 2, len(data) - 64, 7):
            data[i] ^= 0x5A
        f.seek(0)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino


def test_cached_hashes_do_not_hide_bit_rot_once_the_model_failed(make_supervisor, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model, snap)
    model = {"id": "m", "path": str(snap), "checksums": True}
    sup = make_supervisor([model], restart={"quarantine_after": 1}).start()
    assert sup.stop() == 0
    _rot(snap / "model.safetensors")
    sup.start(wait_ready=False)  # the cache (size, mtime, inode) says unchanged: admitted, then...
    sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    assert {r["code"] for r in sup.client.history("m")} == {"CANARY_FAILED"}
    sup.client.release("m")  # ...after failures, the next admission reads every file again
    m = sup.wait_model("m", lambda m: m["state"] == "REJECTED", 60, "REJECTED")
    assert m["last_error"]["code"] == "SNAPSHOT_CORRUPT" and "model.safetensors" in m["last_error"]["message"]


def test_lmx_events_counts_what_is_published(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()
    text = sup.client.metrics()
    line = next(ln for ln in text.splitlines() if ln.startswith('lmx_events_total{event="model.state"}'))
    assert float(line.split()[-1]) >= 4  # UNLOADED -> ADMITTING -> STARTING -> LOADING -> CANARY -> READY


def test_a_warm_spare_stays_warm_while_its_supervisor_lives_and_goes_with_it(make_supervisor,
                                                                            tiny_model: Path) -> None:
    handshake_s = 2.5  # a worker with no Init this long after its hello exits; a spare must not
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}],
                          supervisor={"warm_spares": 1, "handshake_timeout_s": handshake_s}).start()
    wait_until(lambda: sup.status()["supervisor"]["warm_spares"]["ready"] == 1, 60, "a warm spare")
    (spare,) = [e["worker_pid"] for e in sup.events("worker.spawned") if e.get("model") == "spare"]
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: spare not in workers_of(sup.state_dir) or sup.events("worker.spare_died"),
                   handshake_s * 2, "the spare to exit", interval_s=0.5)
    assert len([e for e in sup.events("worker.spawned") if e.get("model") == "spare"]) == 1
    sup.proc.kill()  # the death pipe: an orphaned spare is nobody's, and ends by itself
    sup.proc.wait()
    wait_until(lambda: spare not in workers_of(sup.state_dir), 15, "the orphaned spare to exit at once")
    # The model's own worker waits out its orphan grace (a new supervisor could adopt it).
    wait_until(lambda: not workers_of(sup.state_dir), 30, "the model's orphaned worker after its grace")


def test_a_worker_that_gets_no_init_within_the_handshake_timeout_exits(tmp_path: Path) -> None:
    # Nobody answers its hello: the timeout the supervisor hands down is the one it keeps.
    env = {**os.environ, "LMX_WORKER_ENDPOINT": f"ipc://{tmp_path}/nobody.sock", "LMX_WORKER_TOKEN": "t" * 32,
           "LMX_WORKER_HANDSHAKE_TIMEOUT_S": "0.5"}
    proc = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode == WorkerExit.HANDSHAKE, proc.stderr.decode()[-2000:]
    assert b"worker.handshake_timeout" in proc.stdout + proc.stderr


def test_an_automatic_rollback_outside_model_roots_is_refused(make_supervisor, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    root = tmp_path / "root"
    v1_path, v2_path = tmp_path / "v1", root / "v2"
    shutil.copytree(tiny_model, v1_path)
    shutil.copytree(tiny_model, v2_path)
    restart = {"quarantine_after": 2, "backoff_initial_s": 0.05, "stable_after_s": 0.3}
    sup = make_supervisor([{"id": "m", "path": str(v1_path)}], restart=restart).start()
    sup.wait_model("m", lambda m: m["lkg_revision"] == m["revision"], 10, "v1 last-known-good")
    # The operator confines models to `root` and moves m there, on a build that crashes loading.
    sup.rewrite([{"id": "m", "path": str(v2_path), "worker_command": chaos("--at", "load", "--signal", "SIGABRT")}],
                supervisor={"model_roots": [str(root)]}, restart=restart)
    assert sup.client.reload()["changed"] == ["m"]
    m = sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")
    assert "SNAPSHOT_NOT_FOUND" in m["last_error"]["message"] and "model_roots" in m["last_error"]["message"]
    states = [(e["from"], e["to"]) for e in sup.events("model.state") if e["model"] == "m"]
    assert ("ROLLING_BACK", "QUARANTINED") in states and ("ROLLING_BACK", "STARTING") not in states
