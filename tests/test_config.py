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


GROUP = "[[models]]\nid = 'big'\npath = '/m'\n[models.group]\n"
PEER = "[[peers]]\nname = 'b'\nendpoint = 'tcp://10.0.0.2:7600'\nserver_key_file = 'b.key'\nclient_cert = 'a.key_secret'\n"


@pytest.mark.parametrize(
    "text, key, problem",
    [
        (GROUP + "hosts = ['local']", "models[0].group.hosts", "at least two"),
        (GROUP + "hosts = ['b', 'local']", "models[0].group.hosts", "hosts[0] must be \"local\""),
        (GROUP + "hosts = ['local', 'nowhere']", "models[0].group.hosts", "neither \"local\" nor a [[peers]]"),
        (GROUP + "hosts = ['local', 'local']\nbackend = 'mpi'", "models[0].group.backend", "expected \"ring\""),
        (GROUP + "hosts = ['local', 'local']\nparallel = 'data'", "models[0].group.parallel", "expected \"tensor\""),
        (GROUP + "hosts = ['local', 'local']\nrings = 2", "models[0].group.rings", "unknown key"),
        (GROUP + "hosts = ['local', 'local']\nbackend = 'jaccl'", "models[0].group.jaccl_devices_file", "required"),
        ("[[models]]\nid = 'big'\npath = '/m'\nmax_batch_size = 4\n[models.group]\nhosts = ['local', 'local']",
         "models[0].max_batch_size", "one request at a time"),
        ("[[peers]]\nname = 'b'\nendpoint = 'tcp://x:1'", "peers[0].server_key_file", "required"),
        ("[[peers]]\nname = 'local'\nendpoint = 'tcp://x:1'\nserver_key_file = 'k'\nclient_cert = 'c'",
         "peers[0].name", "taken"),
        ("[[peers]]\nname = 'b'\nendpoint = 'http://x:1'\nserver_key_file = 'k'\nclient_cert = 'c'",
         "peers[0].endpoint", "tcp://"),
    ],
)
def test_group_and_peer_errors_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, "/etc/lmx.toml")
    assert (info.value.key, problem in info.value.problem) == (key, True), info.value


def test_a_group_with_a_peer_parses_one_request_at_a_time_and_keeps_older_revisions(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text("x")
    (tmp_path / "a.key_secret").write_text("x")
    text = PEER + GROUP + "hosts = ['local', 'b']\nring_port = 38500\n"
    c = cfg.parse(text, "x", tmp_path)
    (model,) = c.models
    assert model.group is not None and model.group.hosts == ("local", "b") and model.group.size == 2
    assert (model.max_batch_size, model.prefix_cache_bytes) == (1, 0)
    assert c.peers[0].data_host == "10.0.0.2" and c.peers[0].server_key_file == str(tmp_path / "b.key")
    with pytest.raises(cfg.ConfigError, match="ring_port"):  # a rank on a peer needs known ports
        cfg.parse(PEER + GROUP + "hosts = ['local', 'b']\n", "x", tmp_path)
    # No group: the revision of an older config does not change.
    assert cfg.parse(GOOD, "x", Path("/srv")).models[0].revision == "f8d99eb03c8b"
