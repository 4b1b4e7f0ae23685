"""The admission gate: real broken snapshots are refused before any worker starts, each with its
code and the file it names, in the client's error, in status, in the log and in `lmxctl verify`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol import errors as E
from supervisor.admission import snapshot
from tests.harness import REPO, RunningSupervisor
from tests.snapshots import write_safetensors


def _copy(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    return dest


def _sharded(tiny: Path, dest: Path) -> Path:
    """The tiny model re-written as a two-shard snapshot with an index, as hubs ship big models."""
    from safetensors.numpy import load_file

    dest.mkdir()
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dest / f.name)
    tensors = load_file(str(tiny / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, part in halves.items():
        write_safetensors(dest / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _hub_layout(tiny: Path, root: Path) -> Path:
    """models--org--name/{blobs,snapshots/<rev>} with the snapshot's files as links into blobs."""
    snap = root / "models--org--tiny" / "snapshots" / "0123abcd"
    blobs = root / "models--org--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny.iterdir())):
        blob = blobs / f"blob{i:02d}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def build(kind: str, tiny: Path, tmp: Path) -> tuple[Path, E.ErrorCode, str]:
    """A broken snapshot of `kind`; returns (path, expected code, text its message must contain)."""
    d = tmp / kind
    if kind == "missing-shard":
        d = _sharded(tiny, d)
        (d / "model-00002-of-00002.safetensors").unlink()
        return d, E.ErrorCode.SNAPSHOT_INCOMPLETE, "model-00002-of-00002.safetensors: missing shard(s) (1 of 2"
    if kind == "truncated-shard":
        d = _sharded(tiny, d)
        shard = d / "model-00001-of-00002.safetensors"
        size = shard.stat().st_size
        os.truncate(shard, size - 100)
        return d, E.ErrorCode.SNAPSHOT_CORRUPT, (f"model-00001-of-00002.safetensors: size mismatch: expected {size} "
                                                f"bytes, found {size - 100}")
    if kind == "garbage-header":
        d = _copy(tiny, d)
        with open(d / "model.safetensors", "r+b") as f:
            f.write(b"\xff" * 16)
        return d, E.ErrorCode.SNAPSHOT_CORRUPT, "model.safetensors: unreadable safetensors header"
    if kind == "index-names-missing-tensor":
        d = _sharded(tiny, d)
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return d, E.ErrorCode.SNAPSHOT_CORRUPT, ("model-00001-of-00002.safetensors: 1 tensor(s) named by the index are "
                                                "not in it: ['model.layers.9.mlp.up_proj.weight']")
    if kind == "hub-broken-symlink":
        d = _hub_layout(tiny, d)
        os.unlink(os.path.realpath(d / "tokenizer.json"))
        return d, E.ErrorCode.SNAPSHOT_INCOMPLETE, "tokenizer.json: symlink to a missing blob"
    if kind == "hub-incomplete-blob":
        d = _hub_layout(tiny, d)
        (d.parent.parent / "blobs" / "f00d.incomplete").write_bytes(b"partial")
        return d, E.ErrorCode.SNAPSHOT_INCOMPLETE, "blobs/f00d.incomplete: unfinished download"
    if kind == "unknown-model-type":
        d = _copy(tiny, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "nonesuch_moe"}))
        return d, E.ErrorCode.UNSUPPORTED_ARCHITECTURE, "config.json: model_type 'nonesuch_moe' is not supported by the installed mlx-lm 0."
    if kind == "config-unparsable":
        d = _copy(tiny, d)
        (d / "config.json").write_text("{not json")
        return d, E.ErrorCode.CONFIG_INVALID, "config.json: unparsable"
    if kind == "no-tokenizer":
        d = _copy(tiny, d)
        (d / "tokenizer.json").unlink()
        return d, E.ErrorCode.SNAPSHOT_INCOMPLETE, "tokenizer.json: no tokenizer file"
    raise ValueError(kind)


KINDS = ["missing-shard", "truncated-shard", "garbage-header", "index-names-missing-tensor", "hub-broken-symlink",
         "hub-incomplete-blob", "unknown-model-type", "config-unparsable", "no-tokenizer"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, tuple[Path, E.ErrorCode, str]]:
    tmp = tmp_path_factory.mktemp("broken")
    return {kind: build(kind, tiny_model, tmp) for kind in KINDS}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, broken: dict, tiny_model: Path):
    models = [{"id": kind, "path": str(path)} for kind, (path, _, _) in broken.items()]
    models.append({"id": "sharded-ok", "path": str(_sharded(tiny_model, tmp_path_factory.mktemp("ok") / "s"))})
    s = RunningSupervisor(tmp_path_factory.mktemp("admission"), models).start(wait_ready=False)
    s.wait_model("sharded-ok", lambda m: m["state"] == "READY", 60, "the intact sharded snapshot READY")
    yield s
    s.cleanup()


def test_the_checks_find_nothing_wrong_with_intact_snapshots(tiny_model: Path, tmp_path: Path) -> None:
    assert snapshot.verify(tiny_model) == []
    assert snapshot.verify(_sharded(tiny_model, tmp_path / "sharded")) == []
    assert snapshot.verify(_hub_layout(tiny_model, tmp_path / "hub")) == []


@pytest.mark.parametrize("kind", KINDS)
def test_each_broken_snapshot_is_refused_with_its_code_and_file_before_any_worker(
    sup: RunningSupervisor, broken: dict, kind: str
) -> None:
    _, code, text = broken[kind]
    m = sup.wait_model(kind, lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    assert m["last_error"]["code"] == code.code and text in m["last_error"]["message"]
    assert m["worker_pid"] is None
    assert not [e for e in sup.events("worker.spawned") if e["model"] == kind]
    with pytest.raises(E.LmxError) as info:
        sup.client.complete(kind, "Hello", max_tokens=2)
    assert info.value.code is code and text in info.value.message
    (event,) = [e for e in sup.events("model.state") if e["model"] == kind and e["to"] == "REJECTED"]
    assert event["code"] == code.code and event["file"] and event["file"] in text


def test_an_intact_sharded_snapshot_is_admitted_and_serves(sup: RunningSupervisor) -> None:
    assert sup.client.complete("sharded-ok", "Hello", max_tokens=3).usage["completion_tokens"] >= 1


def test_verify_lists_every_finding_not_just_the_first(sup: RunningSupervisor, tiny_model: Path, tmp_path: Path) -> None:
    d = _sharded(tiny_model, tmp_path / "twice-broken")
    (d / "model-00002-of-00002.safetensors").unlink()
    (d / "tokenizer.json").unlink()
    (d / "config.json").write_text("[]")
    codes = sorted(f.code.code for f in snapshot.verify(d))
    assert codes == ["CONFIG_INVALID", "SNAPSHOT_INCOMPLETE", "SNAPSHOT_INCOMPLETE"]
    out = subprocess.run([sys.executable, "-m", "lmxctl", "verify", str(d)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "model-00002-of-00002.safetensors" in out.stdout and "tokenizer.json" in out.stdout
    assert "3 finding(s)" in out.stdout
    by_id = sup.client.verify("truncated-shard")
    assert [f["code"] for f in by_id["findings"]] == ["SNAPSHOT_CORRUPT"]
    ok = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "verify",
                         "sharded-ok", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["findings"] == []


def test_write_safetensors_round_trip_guard() -> None:
    # The helper the broken snapshots are made with must itself write what the checks accept.
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "x.safetensors"
        write_safetensors(p, {"a": np.zeros((2, 3), np.float16)})
        findings: list = []
        assert snapshot._header(p, p.name, findings) == {"a"} and findings == []


def test_checksums_catch_same_size_corruption_and_cache_unchanged_files(
    make_supervisor, tiny_model: Path, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model, snap)
    sup = make_supervisor([{"id": "m", "path": str(snap), "checksums": True}]).start()
    assert sup.stop() == 0
    weights = snap / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor: headers and sizes still check out
    weights.write_bytes(bytes(data))
    assert snapshot.verify(snap) == []
    sup.start(wait_ready=False)
    m = sup.wait_model("m", lambda m: m["state"] == "REJECTED", 30, "REJECTED")
    assert m["last_error"]["code"] == "SNAPSHOT_CORRUPT"
    assert m["last_error"]["message"].startswith("model.safetensors: checksum mismatch")


def test_a_shipped_manifest_is_the_reference(tmp_path: Path, tiny_model: Path) -> None:
    import hashlib

    from supervisor.admission import checksums

    from supervisor import logs
    from supervisor.persistence.store import Store

    logs.configure(None)
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model, snap)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(snap.iterdir())]
    lines.append(f"{'0' * 64}  model-00002-of-00002.safetensors")
    (snap / "sha256sums.txt").write_text("\n".join(lines) + "\n")
    store = Store(tmp_path)
    findings = checksums.verify(store, str(snap))
    assert [(f.code, f.file) for f in findings] == [
        (E.ErrorCode.SNAPSHOT_INCOMPLETE, "model-00002-of-00002.safetensors")]
    assert store.cached_hash(str((snap / "config.json").resolve()), *(
        lambda st: (st.st_size, st.st_mtime_ns, st.st_ino))((snap / "config.json").stat()))


def test_repair_fetches_only_what_is_missing_or_corrupt_from_the_mirror(
    make_supervisor, tiny_model: Path, tmp_path: Path
) -> None:
    mirror = _sharded(tiny_model, tmp_path / "mirror")
    snap = tmp_path / "snap"
    shutil.copytree(mirror, snap)
    (snap / "model-00002-of-00002.safetensors").unlink()
    shard1 = snap / "model-00001-of-00002.safetensors"
    os.truncate(shard1, shard1.stat().st_size - 10)
    config_mtime = (snap / "config.json").stat().st_mtime_ns
    sup = make_supervisor([{"id": "m", "path": str(snap), "mirror": str(mirror)}]).start(wait_ready=False)
    sup.wait_model("m", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    out = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "repair", "m",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    detail = json.loads(out.stdout)
    assert sorted(detail["fetched"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert detail["findings"] == []
    assert (snap / "config.json").stat().st_mtime_ns == config_mtime  # intact files are left alone
    assert not list(snap.glob(".*lmx-repair"))
    sup.wait_model("m", lambda m: m["state"] == "READY", 30, "READY after repair")


def test_repair_from_the_hub_downloads_only_the_bad_files(
    make_supervisor, tiny_model: Path, tmp_path: Path
) -> None:
    """huggingface_hub against a loopback server that answers like the hub's resolve URLs."""
    from tests.hubserver import FakeHub

    origin = _sharded(tiny_model, tmp_path / "origin")
    snap = tmp_path / "snap"
    shutil.copytree(origin, snap)
    (snap / "model-00002-of-00002.safetensors").unlink()
    (snap / "tokenizer.json").unlink()
    revision = "a" * 40
    with FakeHub("org/tiny", revision, origin) as hub:
        sup = make_supervisor(
            [{"id": "m", "path": str(snap), "hub_repo": "org/tiny", "hub_revision": revision}],
            supervisor={"hub_downloads": True, "hub_endpoint": hub.endpoint},
        ).start(wait_ready=False)
        sup.wait_model("m", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
        detail = sup.client.repair("m")
        assert detail["fetched"] == ["model-00002-of-00002.safetensors", "tokenizer.json"]
        assert detail["source"].startswith("hub org/tiny@" + revision)
        assert detail["findings"] == []
        assert dict(hub.gets) == {"model-00002-of-00002.safetensors": 1, "tokenizer.json": 1}
        assert (snap / "tokenizer.json").read_bytes() == (origin / "tokenizer.json").read_bytes()
        assert not (snap / ".lmx-repair").exists()
        sup.wait_model("m", lambda m: m["state"] == "READY", 30, "READY after repair")


def test_hub_repair_is_refused_while_downloads_are_off(make_supervisor, tiny_model: Path, tmp_path: Path) -> None:
    snap = _copy(tiny_model, tmp_path / "snap")
    (snap / "tokenizer.json").unlink()
    sup = make_supervisor([{"id": "m", "path": str(snap), "hub_repo": "org/tiny", "hub_revision": "main"}]
                          ).start(wait_ready=False)
    sup.wait_model("m", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    with pytest.raises(E.BadRequest, match="downloads are off: set supervisor.hub_downloads = true"):
        sup.client.repair("m")
    assert sup.client.status()["models"][0]["state"] == "REJECTED"
