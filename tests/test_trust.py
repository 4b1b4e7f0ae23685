"""Trust boundaries that need no tcp: the state dir refuses to be shared, model paths stay inside
model_roots (symlinks, `..`, FIFOs, devices), workers start with an allow-listed environment, key
files are written private, and what a peer can make us log is rate-limited."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from protocol import errors as E
from protocol import keys
from supervisor import config as cfg
from supervisor import confinement
from supervisor.admission import snapshot
from supervisor.logs import LogLimit
from supervisor.persistence.statedir import prepare_state_dir, StateDirError
from supervisor.workers import workerenv
from tests.harness import REPO, render_config

ROOT_USER = os.getuid() == 0


# --- the state dir ----------------------------------------------------------------------------


def _run_supervisor(tmp_path: Path, state: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "lmx.toml"
    config.write_text(render_config([], {}))
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config),
                           "--state-dir", str(state)], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_fresh_state_dir_is_0700_and_locked(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    fd = prepare_state_dir(state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        with pytest.raises(StateDirError, match="another supervisor holds"):
            prepare_state_dir(state)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720, 0o702, 0o1777])
def test_a_group_or_world_writable_state_dir_is_refused_not_repaired(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    (state / "control.sock").write_text("planted")
    with pytest.raises(StateDirError, match="writable by group or others"):
        prepare_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == mode  # left as found, for the owner to look at
    assert (state / "control.sock").read_text() == "planted"  # nothing inside was touched
    assert not (state / "supervisor.lock").exists()


def test_the_daemon_refuses_a_writable_state_dir_with_a_clear_message(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    run = _run_supervisor(tmp_path, state)
    assert run.returncode == 1
    assert "writable by group or others" in run.stderr and f"chmod 700 {state}" in run.stderr


def test_a_state_dir_readable_by_others_is_closed_to_0700(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    os.close(prepare_state_dir(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_state_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if ROOT_USER:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 4242, -1)
    else:
        state = Path("/")  # root's, and never ours
    with pytest.raises(StateDirError, match="owned by uid"):
        prepare_state_dir(state)
    if ROOT_USER:
        assert _run_supervisor(tmp_path, state).returncode == 1


def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (state / "supervisor.lock").symlink_to(target)
    with pytest.raises(OSError):
        prepare_state_dir(state)
    assert target.read_text() == "keep me"


def test_stale_sockets_of_a_dead_supervisor_are_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("control.sock", "workers.sock", "events.sock"):
        (state / name).write_text("stale")
    os.close(prepare_state_dir(state))
    assert not any((state / n).exists() for n in ("control.sock", "workers.sock", "events.sock"))


# --- model_roots ------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path, tiny_model: Path) -> dict[str, Path]:
    """A root holding a copy of the tiny snapshot (as symlinks into a blob store inside the root,
    like a Hugging Face cache), and an outside dir with another copy."""
    root = tmp_path / "root"
    blobs = root / "hub" / "blobs"
    snap = root / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_model.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in tiny_model.iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    return {"root": root, "snap": snap, "outside": outside}


def _config(roots_list: list[str], path: str, **model) -> str:
    return render_config([{"id": "m", "path": path, **model}], {"supervisor": {"model_roots": roots_list}})


def _refused(text: str, base: Path, key: str, match: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(text, "lmx.toml", base)
    assert err.value.key == key, err.value
    assert match in err.value.problem, err.value.problem


def test_paths_inside_the_roots_load(roots, tmp_path: Path) -> None:
    c = cfg.parse(_config([str(roots["root"])], str(roots["snap"]), mirror=str(roots["root"] / "hub" / "blobs")),
                  "lmx.toml", tmp_path)
    assert c.models[0].path == str(roots["snap"])
    # No roots: anything goes, as before.
    cfg.parse(_config([], str(roots["outside"])), "lmx.toml", tmp_path)


def test_a_path_outside_the_roots_is_refused_at_config_load(roots, tmp_path: Path) -> None:
    r = [str(roots["root"])]
    _refused(_config(r, str(roots["outside"])), tmp_path, "models[0].path", "outside supervisor.model_roots")
    _refused(_config(r, str(roots["snap"] / ".." / ".." / ".." / ".." / "outside")), tmp_path, "models[0].path",
             "outside")
    _refused(_config(r, str(roots["snap"]), mirror=str(roots["outside"])), tmp_path, "models[0].mirror", "outside")
    # A root named through a prefix of another dir's name does not cover it (/x/root vs /x/root2).
    sibling = tmp_path / "root2"
    sibling.mkdir()
    _refused(_config(r, str(sibling)), tmp_path, "models[0].path", "outside")
    _refused(_config(["relative/root"], str(roots["snap"])), tmp_path, "supervisor.model_roots", "absolute")


def test_symlinks_out_of_the_roots_are_refused(roots, tmp_path: Path) -> None:
    r = [str(roots["root"])]
    link = roots["root"] / "link-out"
    link.symlink_to(roots["outside"])
    _refused(_config(r, str(link)), tmp_path, "models[0].path", "outside")
    # One file of the snapshot leads out of the root.
    (roots["snap"] / "tokenizer.json").unlink()
    (roots["snap"] / "tokenizer.json").symlink_to(roots["outside"] / "tokenizer.json")
    _refused(_config(r, str(roots["snap"])), tmp_path, "models[0].path", "tokenizer.json: is a symlink")


def test_fifos_and_devices_anywhere_in_a_snapshot_are_refused(roots, tmp_path: Path) -> None:
    r = [str(roots["root"])]
    sub = roots["snap"] / "sub" / "deeper"
    sub.mkdir(parents=True)
    os.mkfifo(sub / "weights.safetensors")
    _refused(_config(r, str(roots["snap"])), tmp_path, "models[0].path", "sub/deeper/weights.safetensors: is a FIFO")
    os.unlink(sub / "weights.safetensors")
    (roots["snap"] / "extra").symlink_to("/dev/zero")
    # /dev is outside the root; with the root widened to /, the device itself is what is refused.
    _refused(_config(r, str(roots["snap"])), tmp_path, "models[0].path", "outside")
    _refused(_config(["/"], str(roots["snap"])), tmp_path, "models[0].path", "a character device")


def test_an_index_naming_shards_outside_the_snapshot_is_refused(roots) -> None:
    index = roots["outside"] / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../../../etc/passwd"}}))
    with pytest.raises(confinement.Refused, match="outside the snapshot"):
        confinement.check_tree(roots["outside"])
    findings = snapshot.verify(roots["outside"])
    assert [f.code for f in findings] == [E.ErrorCode.SNAPSHOT_CORRUPT]


def test_a_fifo_in_a_snapshot_never_blocks_the_checks(tmp_path: Path, tiny_model: Path) -> None:
    """Even without model_roots: opening a FIFO named config.json would block the supervisor forever."""
    snap = tmp_path / "snap"
    snap.mkdir()
    for f in tiny_model.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap / "config.json").unlink()
    os.mkfifo(snap / "config.json")
    result: list = []
    t = threading.Thread(target=lambda: result.append(snapshot.verify(snap)), daemon=True)
    t.start()
    t.join(10)
    assert result, "snapshot.verify blocked on a FIFO"
    (finding,) = result[0]
    assert finding.code is E.ErrorCode.SNAPSHOT_CORRUPT and finding.file == "config.json"
    assert "FIFO" in finding.message


def test_probe_paths_are_confined(make_supervisor, roots, tiny_model: Path) -> None:
    fifo_snap = roots["root"] / "fifo-snap"
    fifo_snap.mkdir()
    os.mkfifo(fifo_snap / "config.json")
    escape = roots["root"] / "escape"
    escape.symlink_to(roots["outside"])
    sup = make_supervisor([{"id": "m", "path": str(roots["snap"])}],
                          supervisor={"model_roots": [str(roots["root"])]}).start()
    for path, match in ((str(roots["outside"]), "outside supervisor.model_roots"),
                        (str(roots["snap"]) + "/../../../../outside", "outside"),
                        (str(escape), "outside"),
                        (str(fifo_snap), "config.json: is a FIFO"),
                        ("/etc", "outside")):
        with pytest.raises(E.BadRequest, match=match):
            sup.client.probe(path, timeout_s=30)
    assert sup.model("m")["state"] == "READY"
    assert sup.client.complete("m", "Hello", max_tokens=3).usage["completion_tokens"] >= 1


# --- the worker's environment -----------------------------------------------------------------


def test_workerenv_keeps_only_the_allow_list() -> None:
    parent = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "MLX_X": "1", "AWS_SECRET_ACCESS_KEY": "s",
              "HF_TOKEN": "t", "GITHUB_TOKEN": "g", "SSH_AUTH_SOCK": "/tmp/agent", "LD_PRELOAD": "/evil.so"}
    env = workerenv.build(parent, {"LMX_WORKER_TOKEN": "tok"})
    assert env == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "MLX_X": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "LMX_WORKER_TOKEN": "tok"}
    assert "HF_HUB_OFFLINE" not in workerenv.build(parent, {}, hub_downloads=True)


def test_workers_start_with_a_minimal_environment_in_their_own_process_group(
        make_supervisor, tiny_model: Path, monkeypatch) -> None:
    secret = "AKIA-not-a-real-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the supervisor's own setting does not leak through
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "memory_limit_bytes": 8 * 2**30}]).start()
    pid = sup.model("m")["worker_pid"]
    env = psutil.Process(pid).environ()
    assert "AWS_SECRET_ACCESS_KEY" not in env and "HF_TOKEN" not in env
    assert secret not in json.dumps(env)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert set(env) <= workerenv.ALLOWED | {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONUNBUFFERED"} | {
        k for k in env if k.startswith(("LMX_", "LC_", "MLX_", "METAL_"))}
    assert {"LMX_WORKER_ENDPOINT", "LMX_WORKER_TOKEN", "LMX_MODEL_ID", "LMX_DEATH_FD"} <= set(env)
    # Its own session and process group (what the stop ladder signals), not the supervisor's.
    assert os.getpgid(pid) == pid == os.getsid(pid) and os.getpgid(pid) != os.getpgid(sup.proc.pid)
    if sys.platform.startswith("linux"):  # the memory limit it set on itself (RLIMIT_AS)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert str(8 * 2**30) in next(line for line in limits.splitlines() if "address space" in line)
    assert sup.client.complete("m", "Hello", max_tokens=3).usage["completion_tokens"] >= 1


# --- key files ----------------------------------------------------------------------------------


def test_lmxctl_keys_new_writes_a_private_secret_and_prints_the_public_key(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    run = subprocess.run([sys.executable, "-m", "lmxctl", "keys", "new", "alice", "--dir", str(d)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    public = run.stdout.strip()
    assert len(public) == 40
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "alice.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "alice.key").stat().st_mode) == 0o644
    assert keys.load_public(d / "alice.key").decode() == public
    pub, sec = keys.load_secret(d / "alice.key_secret")
    assert pub.decode() == public and len(sec) == 40
    assert sec.decode() not in run.stdout + run.stderr + (d / "alice.key").read_text()
    again = subprocess.run([sys.executable, "-m", "lmxctl", "keys", "new", "alice", "--dir", str(d)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    assert keys.load_secret(d / "alice.key_secret") == (pub, sec)  # not overwritten
    os.chmod(d / "alice.key_secret", 0o640)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load_secret(d / "alice.key_secret")


# --- rate-limited logging -------------------------------------------------------------------------


def test_log_limit_bursts_then_trickles_and_counts_what_it_dropped() -> None:
    now = [0.0]
    lines: list[tuple[str, dict]] = []

    class Logger:
        def warning(self, event: str, **fields) -> None:
            lines.append((event, fields))

    limit = LogLimit(Logger(), burst=5, per_s=1.0, clock=lambda: now[0])
    for _ in range(1000):
        limit.log("warning", "client.bad_request", code="BAD_REQUEST")
    assert len(lines) == 5
    now[0] += 2.0
    for _ in range(1000):
        limit.log("warning", "client.bad_request", code="BAD_REQUEST")
    assert len(lines) == 7 and lines[5][1]["suppressed"] == 995
    limit.log("warning", "worker.unknown_peer")  # each event has its own bucket
    assert lines[-1][0] == "worker.unknown_peer"
