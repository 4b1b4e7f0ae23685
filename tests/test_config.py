"""Config: validated once, errors name file, key and expectation; revisions are stable hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import config as cfg

GOOD = """
[supervisor]
orphan_grace_s = 30
heartbeat_interval_s = 0.5
[restart]
quarantine_after = 5
[[models]]
id = "smollm2"
path = "models/smol"
memory_limit_bytes = 1000000000
[models.canary]
prompt = "What is the capital of France?"
expect = "Paris"
max_tokens = 16
[[models]]
id = "other"
path = "/abs/other"
autoload = false
worker_command = ["python", "-m", "tests.chaos_worker"]
"""


def test_good_config_parses_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    c = cfg.parse(GOOD, "lmx.toml", tmp_path)
    assert c.supervisor.orphan_grace_s == 30.0 and c.supervisor.heartbeat_timeout_s == 5.0
    assert c.restart.quarantine_after == 5 and c.restart.window_s == 600.0
    smol, other = c.models
    assert smol.path == str(tmp_path / "models" / "smol")
    assert smol.canary.expect == "Paris" and smol.canary.max_tokens == 16
    assert other.autoload is False and other.worker_command == ("python", "-m", "tests.chaos_worker")
    assert other.canary == cfg.CanarySettings()


def test_revision_is_stable_and_changes_with_the_section(tmp_path: Path) -> None:
    a = cfg.parse(GOOD, "x", tmp_path).models[0]
    b = cfg.parse(GOOD, "x", tmp_path).models[0]
    c = cfg.parse(GOOD.replace('expect = "Paris"', 'expect = "Lyon"'), "x", tmp_path).models[0]
    other = cfg.parse(GOOD.replace("autoload = false", "autoload = true"), "x", tmp_path).models[0]
    assert a.revision == b.revision != c.revision
    assert other.revision == a.revision  # another model's change is not this model's revision
    assert len(a.revision) == 12
    # A key added in a later version, left unset, leaves the revisions of older configs unchanged.
    assert cfg.parse(GOOD, "x", Path("/srv")).models[0].revision == "f8d99eb03c8b"


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("[supervisor]\norphan_grace_s = 'long'", "supervisor.orphan_grace_s", "expected a number"),
        ("[supervisor]\nheartbeat_timeout_s = -1", "supervisor.heartbeat_timeout_s", "must be >= 0"),
        ("[supervisor]\nheartbeat_timout_s = 3", "supervisor.heartbeat_timout_s", "unknown key"),
        ("[restart]\nquarantine_after = 2.5", "restart.quarantine_after", "expected an integer"),
        ("[[models]]\npath = '/x'", "models[0].id", "required key is missing"),
        ("[[models]]\nid = 'a'", "models[0].path", "required key is missing"),
        ("[[models]]\nid = 'a b'\npath = '/x'", "models[0].id", "expected letters"),
        ("[[models]]\nid = 'a'\npath = '/x'\nautoload = 1", "models[0].autoload", "expected a boolean"),
        ("[[models]]\nid = 'a'\npath = '/x'\n[[models]]\nid = 'a'\npath = '/y'", "models[1].id", "duplicate"),
        ("[[models]]\nid = 'a'\npath = '/x'\n[models.canary]\nmax_tokens = 0", "models[0].canary.max_tokens",
         "must be >= 1"),
        ("[[models]]\nid = 'a'\npath = '/x'\nworker_command = 'python'", "models[0].worker_command",
         "expected a list"),
        ("[[models]]\nid = 'a'\npath = '/x'\nhub_repo = 'org/a'", "models[0].hub_revision", "required with hub_repo"),
        ("[[models]]\nid = 'a'\npath = '/x'\nhub_repo = 'a'\nhub_revision = 'main'", "models[0].hub_repo",
         "expected \"org/name\""),
        ("models = 3", "models", "expected an array"),
        ("bogus = 1", "bogus", "unknown key"),
        ("[supervisor\n", "(syntax)", ""),
        ("[supervisor]\nheartbeat_interval_s = 5.0\nheartbeat_timeout_s = 2.0",
         "supervisor.heartbeat_timeout_s", "must exceed"),
    ],
)
def test_errors_name_file_key_and_expectation(text: str, key: str, problem: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, "/etc/lmx.toml")
    assert info.value.file == "/etc/lmx.toml"
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"/etc/lmx.toml: {key}: ")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.toml")


def test_config_is_immutable(tmp_path: Path) -> None:
    c = cfg.parse(GOOD, "x", tmp_path)
    with pytest.raises(AttributeError):
        c.models[0].path = "/elsewhere"  # type: ignore[misc]
