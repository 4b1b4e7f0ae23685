"""The optional tcp control endpoint, over loopback: only CURVE keys on the allow-list get through,
each with its role; everyone else gets nothing at all, within a bounded time. Clients are separate
processes (lmxctl). Afterwards no secret key and no worker token is in the log, stderr or status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from protocol import codec, keys
from protocol import errors as E
from protocol.syncclient import SyncSupervisorClient
from supervisor import config as cfg
from tests.harness import REPO, RunningSupervisor, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("remote")
    kd = root / "keys"
    made = {name: keys.new_keypair(name, kd) for name in ("server", "alice", "bob", "eve")}
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    sup = RunningSupervisor(root, [{"id": "m", "path": str(tiny_model)}],
                            supervisor={"listen": endpoint, "curve_secret_key_file": "keys/server.key_secret"})
    clients = [{"name": "alice", "public_key_file": "keys/alice.key", "role": "read"},
               {"public_key_file": "keys/bob.key", "role": "admin"}]  # name: the file's stem
    sup.clients_toml = "".join(
        "[[clients]]\n" + "".join(f'{k} = "{v}"\n' for k, v in c.items()) for c in clients)
    sup.config_path.write_text(sup.config_path.read_text() + sup.clients_toml)
    sup.start()
    sup.endpoint, sup.keydir, sup.keys = endpoint, kd, made
    yield sup
    sup.cleanup()


def lmxctl(sup: RunningSupervisor, who: str | None, *args: str, server_key: str = "server",
           timeout_s: float = 60) -> subprocess.CompletedProcess:
    """A real second client process, over tcp only (no state dir)."""
    opts = ["--endpoint", sup.endpoint, "--timeout", "15"]
    if who is not None:
        opts += ["--server-key", str(sup.keydir / f"{server_key}.key"),
                 "--client-cert", str(sup.keydir / f"{who}.key_secret")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env["LMX_STATE_DIR"] = "/nonexistent"  # prove nothing goes through ipc
    return subprocess.run([sys.executable, "-m", "lmxctl", *opts, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def test_a_read_key_gets_status_and_generate(remote: RunningSupervisor) -> None:
    status = lmxctl(remote, "alice", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["models"][0]["state"] == "READY"
    gen = lmxctl(remote, "alice", "generate", "m", "Hello", "--max-tokens", "3", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["usage"]["completion_tokens"] >= 1
    for op in ("verify", "compat", "metrics", "history"):
        run = lmxctl(remote, "alice", *([op, "m"] if op in ("verify", "history") else [op]), "--json")
        assert run.returncode == 0, (op, run.stderr)


@pytest.mark.parametrize("args,op", [(("unload", "m"), "unload"), (("load", "m", "--no-wait"), "load"),
                                     (("reload",), "reload"), (("release", "m"), "release"),
                                     (("rollback", "m"), "rollback"), (("probe", "/tmp"), "probe"),
                                     (("repair", "m"), "repair")])
def test_a_read_key_asking_for_an_admin_op_is_unauthorized_and_logged(remote: RunningSupervisor, args, op) -> None:
    run = lmxctl(remote, "alice", *args, "--json")
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["code"] == "UNAUTHORIZED"
    denied = wait_until(lambda: [r for r in remote.events("auth.denied") if r["op"] == op], 5, "auth.denied")
    assert denied[-1]["client"] == "alice" and denied[-1]["role"] == "read"
    assert remote.model("m")["state"] == "READY"  # nothing happened


def test_an_admin_key_may_use_admin_ops(remote: RunningSupervisor) -> None:
    run = lmxctl(remote, "bob", "reload", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"added": [], "removed": [], "changed": []}
    assert lmxctl(remote, "bob", "generate", "m", "Hello", "--max-tokens", "2").returncode == 0


def test_a_key_not_on_the_list_gets_nothing(remote: RunningSupervisor) -> None:
    start = time.monotonic()
    run = lmxctl(remote, "eve", "status", "--json")
    assert run.returncode == 1 and json.loads(run.stdout)["error"]["code"] == "UNAUTHORIZED"
    assert "models" not in run.stdout
    assert time.monotonic() - start < 15
    refused = wait_until(lambda: remote.events("auth.refused"), 5, "auth.refused")
    eve_public = remote.keys["eve"][2]
    assert all(eve_public not in json.dumps(r) for r in refused)
    assert refused[-1]["reason"] == "key not in [[clients]]" and len(refused[-1]["key_sha256"]) == 12


def test_a_wrong_server_key_or_no_key_gets_nothing_within_a_bounded_time(remote: RunningSupervisor) -> None:
    start = time.monotonic()
    wrong = lmxctl(remote, "bob", "status", "--json", server_key="eve")  # bob's keys, but not this server
    nokey = lmxctl(remote, None, "status", "--json")
    assert time.monotonic() - start < 40
    for run in (wrong, nokey):
        assert run.returncode in (1, 3), run
        assert json.loads(run.stdout)["error"]["code"] in ("SUPERVISOR_UNAVAILABLE", "REQUEST_TIMEOUT")


def test_plain_zeromq_on_the_tcp_port_never_gets_an_answer(remote: RunningSupervisor) -> None:
    """A raw DEALER without CURVE (and one with a stranger's key) sending valid requests: silence."""
    ctx = zmq.Context()
    try:
        socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
        server = keys.load_public(remote.keydir / "server.key")
        public, secret = zmq.curve_keypair()
        socks[1].curve_serverkey, socks[1].curve_publickey, socks[1].curve_secretkey = server, public, secret
        frames = [codec.PROTOCOL, msgpack.packb(["status", {"request_id": "x"}])]
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(remote.endpoint)
            for _ in range(10):
                s.send_multipart(frames, zmq.NOBLOCK) if s.poll(0, zmq.POLLOUT) else None
        time.sleep(2.0)
        assert not any(s.poll(0) for s in socks)
        for s in socks:
            s.close(0)
    finally:
        ctx.term()
    assert remote.model("m")["state"] == "READY"


def test_the_library_takes_z85_keys_too(remote: RunningSupervisor) -> None:
    server = keys.load_public(remote.keydir / "server.key")
    public, secret = keys.load_secret(remote.keydir / "bob.key_secret")
    with SyncSupervisorClient(remote.endpoint, curve_server_key=server.decode(), curve_public_key=public,
                              curve_secret_key=secret, timeout_s=15) as c:
        assert c.status()["models"][0]["state"] == "READY"
        assert c.complete("m", "Hello", max_tokens=2).usage["completion_tokens"] >= 1
    with pytest.raises(keys.KeyFileError, match="keypair"):
        SyncSupervisorClient(remote.endpoint, curve_server_key=server)  # half a configuration: refused


def test_a_key_removed_by_reload_is_refused_from_then_on(remote: RunningSupervisor) -> None:
    alice = SyncSupervisorClient(remote.endpoint, server_key_file=remote.keydir / "server.key",
                                 client_cert=remote.keydir / "alice.key_secret", timeout_s=15)
    try:
        assert alice.status()["models"][0]["state"] == "READY"
        text = remote.config_path.read_text()
        remote.config_path.write_text(text.replace(remote.clients_toml, remote.clients_toml.split("[[clients]]\n")[0]
                                                   + "[[clients]]\n" + remote.clients_toml.split("[[clients]]\n")[2]))
        assert lmxctl(remote, "bob", "reload").returncode == 0
        with pytest.raises(E.Unauthorized):
            alice.status()  # the open session: every request refused
        assert lmxctl(remote, "alice", "status").returncode == 1  # a new one: refused in the handshake
    finally:
        alice.close()
        remote.config_path.write_text(text)
        assert lmxctl(remote, "bob", "reload").returncode == 0


def test_no_secret_key_or_worker_token_in_logs_stderr_or_status(remote: RunningSupervisor) -> None:
    # Exercise every path first: good and bad keys, a denial (the other tests may run alone).
    lmxctl(remote, "alice", "status")
    lmxctl(remote, "alice", "unload", "m")
    lmxctl(remote, "eve", "status")
    secrets = {name: keys.load_secret(sec)[1].decode() for name, (_, sec, _) in remote.keys.items()}
    pid = remote.model("m")["worker_pid"]
    token = psutil.Process(pid).environ()["LMX_WORKER_TOKEN"]
    assert len(token) >= 32
    status = json.dumps(remote.status())
    texts = {"supervisor.log": (remote.state_dir / "logs" / "supervisor.log").read_text(),
             "stderr": remote.stderr_path.read_text(), "status": status}
    for log in (remote.state_dir / "logs").glob("worker-*.log"):
        texts[log.name] = log.read_text()
    for where, text in texts.items():
        for name, secret in secrets.items():
            assert secret not in text, f"{name}'s secret key is in {where}"
        assert token not in text, f"a worker token is in {where}"
    assert "auth.accepted" in texts["supervisor.log"] and "auth.denied" in texts["supervisor.log"]


def test_plain_tcp_without_curve_is_refused_at_config_load(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse('[supervisor]\nlisten = "tcp://127.0.0.1:5555"\n', "lmx.toml", tmp_path)
    assert err.value.key == "supervisor.curve_secret_key_file" and "plain tcp is refused" in err.value.problem
    keys.new_keypair("server", tmp_path)
    for text, key, match in (
        ('listen = "ipc:///tmp/x"\ncurve_secret_key_file = "server.key_secret"', "supervisor.listen", "tcp://"),
        ('listen = "tcp://127.0.0.1"\ncurve_secret_key_file = "server.key_secret"', "supervisor.listen", "PORT"),
        ('listen = "tcp://127.0.0.1:5555"\ncurve_secret_key_file = "server.key"', "supervisor.curve_secret_key_file",
         "group or others"),  # the public file (0644) named as the secret one
        ('listen = "tcp://127.0.0.1:5555"\ncurve_secret_key_file = "nope"', "supervisor.curve_secret_key_file",
         "nope"),
    ):
        with pytest.raises(cfg.ConfigError) as err:
            cfg.parse(f"[supervisor]\n{text}\n", "lmx.toml", tmp_path)
        assert err.value.key == key and match in err.value.problem, err.value
    os.chmod(tmp_path / "server.key_secret", 0o644)
    with pytest.raises(cfg.ConfigError, match="chmod 600"):
        cfg.parse('[supervisor]\nlisten = "tcp://127.0.0.1:5555"\ncurve_secret_key_file = "server.key_secret"\n',
                  "lmx.toml", tmp_path)
    for clients, key in (('[[clients]]\npublic_key_file = "server.key"\nrole = "root"\n', "clients[0].role"),
                         ('[[clients]]\nrole = "read"\n', "clients[0].public_key_file"),
                         ('[[clients]]\npublic_key_file = "missing.key"\nrole = "read"\n', "clients[0].public_key_file"),
                         ('[[clients]]\npublic_key_file = "server.key"\nrole = "read"\nkey = "x"\n', "clients[0].key"),
                         ('[[clients]]\npublic_key_file = "server.key"\nrole = "read"\n' * 2, "clients[1].name")):
        with pytest.raises(cfg.ConfigError) as err:
            cfg.parse(clients, "lmx.toml", tmp_path)
        assert err.value.key == key, err.value
