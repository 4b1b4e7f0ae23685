"""The compatibility registry: evidence from every load, canary and crash; known-bad combinations
refused at admission; greedy canary output fingerprinted per stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.messages import Final
from supervisor import logs
from supervisor.admission.evidence import Evidence
from supervisor.config import CanarySettings
from supervisor.persistence.store import Store
from tests.harness import REPO, wait_until, workers_of


def _final(text: str) -> Final:
    return Final("r", text, "stop", {"completion_tokens": 3}, {"total_s": 0.1, "decode_tokens_per_s": 30.0})


def test_same_stack_different_greedy_text_fails_other_stack_is_drift(tmp_path: Path, tiny_model: Path) -> None:
    logs.configure(None)
    store = Store(tmp_path)
    a = Evidence(store, "m", str(tiny_model), None)
    a.canary_passed(CanarySettings(prompt="p"), _final("Paris"), 0.5, {})
    b = Evidence(store, "m", str(tiny_model), None)
    b.backend = "mlx-lm 9.9 / mlx 9.9 / elsewhere"
    assert b.canary_passed(CanarySettings(prompt="p"), _final("Lyon"), 0.5, {})["drift"] is True
    with pytest.raises(E.CanaryFailed, match="differs from this stack"):
        a.canary_passed(CanarySettings(prompt="p"), _final("Lyon"), 0.5, {})
    (row,) = [r for r in store.compat() if r["backend"] == a.backend]
    assert row["outcome"] == "verified" and row["evidence"]["canary"]["text"] == "Paris"


def test_registry_is_written_on_ready_and_survives_a_restart(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()
    (row,) = sup.client.compat()["rows"]
    assert row["model"] == "m" and row["outcome"] == "verified"
    assert row["evidence"]["canary"]["tokens"] >= 1 and row["evidence"]["load_s"] > 0
    assert sup.model("m")["canary"]["tokens"] >= 1
    assert sup.stop() == 0
    sup.start()
    (again,) = sup.client.compat()["rows"]
    assert again["first_seen"] == row["first_seen"] and again["last_seen"] > row["last_seen"]
    table = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "compat",
                            "--markdown"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "| m | verified" in table.stdout


def _unloadable(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    return dest


def test_a_known_bad_combination_is_refused_unless_forced(make_supervisor, tiny_model: Path, tmp_path: Path) -> None:
    broken = _unloadable(tiny_model, tmp_path / "broken")
    sup = make_supervisor([{"id": "first", "path": str(broken)},
                           {"id": "twin", "path": str(broken), "autoload": False}],
                          restart={"quarantine_after": 2, "backoff_initial_s": 0.05}).start(wait_ready=False)
    sup.wait_model("first", lambda m: m["state"] == "QUARANTINED", 30, "QUARANTINED")
    records = sup.client.history("first")  # weights that pass the file checks and fail mlx's load
    assert [r["code"] for r in records] == ["LOAD_FAILED", "LOAD_FAILED"]
    assert any("load_failed" in line for line in records[0]["stderr_tail"])
    (row,) = sup.client.compat()["rows"]  # two separate starts failed loading: the verdict
    assert row["outcome"] == "failed" and row["evidence"]["crashes"] == {"LOAD_FAILED": 2}
    sup.client.load("twin")
    m = sup.wait_model("twin", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    assert m["last_error"]["code"] == "COMPAT_KNOWN_BAD" and "--force" in m["last_error"]["message"]
    assert not [e for e in sup.events("worker.spawned") if e["model"] == "twin"]
    sup.client.load("twin", force=True)  # tried: one real start is enough (quarantine is in-process)
    wait_until(lambda: sup.client.history("twin"), 30, "the forced start to fail")
    assert {r["code"] for r in sup.client.history("twin")} == {"LOAD_FAILED"}
    assert [e for e in sup.events("worker.spawned") if e["model"] == "twin"]


def test_corrupt_weights_that_pass_the_file_checks_change_the_canary_and_fail_it(
    make_supervisor, tiny_model: Path, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model, snap)
    sup = make_supervisor([{"id": "m", "path": str(snap)}], restart={"quarantine_after": 1}).start()
    before = sup.model("m")["canary"]["text"]
    assert sup.stop() == 0
    weights = snap / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) - 64, 7):  # bit rot in the tensor data, same size
        data[i] ^= 0x5A
    weights.write_bytes(bytes(data))
    sup.start(wait_ready=False)
    m = sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 30, "QUARANTINED")
    assert m["last_error"]["code"] == "MODEL_QUARANTINED"
    (record,) = sup.client.history("m")
    assert record["code"] == "CANARY_FAILED" and "differs from this stack" in record["cause"], (before, record)


def test_probe_loads_and_canaries_a_snapshot_in_a_throwaway_worker(make_supervisor, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "autoload": False}]).start(wait_ready=False)
    good = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "probe",
                           str(tiny_model), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    detail = json.loads(good.stdout)
    assert detail["state"] == "READY" and detail["registry"]["outcome"] == "verified"
    assert detail["canary"]["tokens"] >= 1
    spawned = [e["worker_pid"] for e in sup.events("worker.spawned")]
    assert len(spawned) == 1 and not workers_of(sup.state_dir)  # the throwaway worker is gone
    assert [m["id"] for m in sup.status()["models"]] == ["m"]
    bad_path = str(_unloadable(tiny_model, tmp_path / "bad"))
    bad = sup.client.probe(bad_path)
    assert bad["state"] == "QUARANTINED" and bad["registry"]["evidence"]["crashes"] == {"LOAD_FAILED": 1}
    again = sup.client.probe(bad_path)  # a second probe tries again and adds its evidence
    assert again["state"] == "QUARANTINED" and again["registry"]["evidence"]["crashes"] == {"LOAD_FAILED": 2}
