"""A model id names files and directories in the state dir (its prefix-cache dir, its workers' log
files, a group's hostfile), so it is a safe path component, checked when the config is loaded (at
start and at reload, with one message), and every delete stays inside the directory it means: no id,
name or link makes `lmxctl cache clear` remove anything outside the model's own cache dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.admission import kvcache
from supervisor.config import ConfigError, parse
from tests.harness import REPO, RunningSupervisor, render_config

pytestmark = pytest.mark.timeout(120)

UNSAFE = ["..", ".", "", "../x", "a/b", "a\\b", "x\x00y", "tab\there", "\x1b[31m", ".hidden", "é", "x" * 129]


@pytest.mark.parametrize("model_id", UNSAFE, ids=[repr(i)[:20] for i in UNSAFE])
def test_an_unsafe_model_id_is_refused_at_load_naming_it(model_id: str) -> None:
    text = render_config([{"id": model_id, "path": "/x"}], {})
    with pytest.raises(ConfigError) as info:
        parse(text, "lmx.toml")
    assert info.value.key == "models[0].id"
    problem = info.value.problem
    assert "state dir" in problem and (repr(model_id) in problem or "at most 128 characters" in problem), problem


def test_safe_ids_still_load() -> None:
    ids = ["tiny", "Qwen3-0.6B", "llama_3.2-1b.q4", "a" * 128, "v1..2"]
    config = parse(render_config([{"id": i, "path": "/x"} for i in ids], {}), "lmx.toml")
    assert [m.id for m in config.models] == ids


def _lmxctl(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_the_supervisor_refuses_to_start_on_an_id_of_dotdot(tmp_path: Path) -> None:
    config = tmp_path / "lmx.toml"
    config.write_text(render_config([{"id": "..", "path": str(tmp_path)}], {}))
    done = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config),
                           "--state-dir", str(tmp_path / "state")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "models[0].id: must not start with '.' (never '.' or '..'), got '..'" in done.stderr


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("safe-ids"), [{"id": "tiny", "path": str(tiny_model)}])
    try:
        yield s.start()
    finally:
        s.cleanup()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_lmxctl_cache_clear_of_an_unsafe_name_deletes_nothing_and_fails_clearly(sup: RunningSupervisor) -> None:
    cache = sup.state_dir / "prefix-cache" / "tiny"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "entry.safetensors").write_bytes(b"x" * 10)
    (sup.state_dir / "sentinel").write_text("still here")
    before = _tree(sup.state_dir) - {"logs/supervisor.log"}
    for name in ("..", ".", "../x", "../../etc", "tiny/..", "/"):
        done = _lmxctl(sup.state_dir, "cache", "clear", name)
        assert done.returncode != 0, (name, done.stdout)
        assert "UNKNOWN_MODEL" in done.stderr and "is not declared" in done.stderr, (name, done.stderr)
        assert before <= _tree(sup.state_dir), f"{name!r} removed {before - _tree(sup.state_dir)}"
    assert sup.proc is not None and sup.proc.poll() is None and sup.model("tiny")["state"] == "READY"


def test_a_link_in_the_cache_dir_is_never_followed_by_a_clear(sup: RunningSupervisor, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.safetensors").write_bytes(b"keep")
    root = sup.state_dir / "prefix-cache"
    root.mkdir(exist_ok=True)
    (root / "planted").symlink_to(outside, target_is_directory=True)
    try:
        done = _lmxctl(sup.state_dir, "cache", "clear")  # every model's
        assert done.returncode == 0, done.stderr
        assert (outside / "precious.safetensors").read_bytes() == b"keep"
        # The model's own dir replaced by a link: refused, nothing removed through it.
        own = root / "tiny"
        if own.exists():
            os.rename(own, root / "tiny-aside")
        own.symlink_to(outside, target_is_directory=True)
        done = _lmxctl(sup.state_dir, "cache", "clear", "tiny")
        assert done.returncode != 0 and "BAD_REQUEST" in done.stderr and "refused" in done.stderr, done.stderr
        assert (outside / "precious.safetensors").read_bytes() == b"keep"
    finally:
        for link in (root / "planted", root / "tiny"):
            if link.is_symlink():
                link.unlink()


def test_reload_refuses_an_unsafe_id_with_the_same_message_and_changes_nothing(sup: RunningSupervisor,
                                                                              tiny_model: Path) -> None:
    good = sup.config_path.read_text()
    try:
        sup.rewrite([{"id": "tiny", "path": str(tiny_model)}, {"id": "..", "path": str(tiny_model)}])
        done = _lmxctl(sup.state_dir, "reload")
        assert done.returncode != 0
        assert "models[1].id: must not start with '.' (never '.' or '..'), got '..'" in done.stderr, done.stderr
        assert [m["id"] for m in sup.status()["models"]] == ["tiny"]
    finally:
        sup.config_path.write_text(good)


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/../..", "/abs"])
def test_the_cache_dir_of_a_name_outside_it_is_refused_before_any_delete(tmp_path: Path, name: str) -> None:
    state = tmp_path / "state"
    (state / "prefix-cache" / "m").mkdir(parents=True)
    (state / "store.sqlite3").write_text("the store")
    refused: Exception | None = None
    try:
        kvcache.clear(state, name) if name else kvcache.directory(state, name)
    except Exception as exc:  # noqa: BLE001 - which one is asserted below, after what is left
        refused = exc
    assert (state / "store.sqlite3").read_text() == "the store" and (state / "prefix-cache" / "m").is_dir()
    assert type(refused).__name__ == "OutsideCache" and "does not name a directory inside" in str(refused)
