"""`lmxctl swap a b` outlives the supervisor (issue 16, item 9): after a restart requests for `a`
are still served by `b`, on the ipc socket and on the tcp endpoint alike, until `lmxctl load a`
takes the name back (which the store forgets too)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import keys
from tests.harness import REPO

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_generate(endpoint: str, kd: Path, model: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env["LMX_STATE_DIR"] = "/nonexistent"  # over tcp only
    return subprocess.run([sys.executable, "-m", "lmxctl", "--endpoint", endpoint, "--timeout", "30",
                           "--server-key", str(kd / "server.key"), "--client-cert", str(kd / "ops.key_secret"),
                           "generate", model, "Hello", "--max-tokens", "3", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_swap_survives_a_restart_and_the_tcp_endpoint_knows_it(make_supervisor, tiny_model: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}],
                          supervisor={"listen": endpoint, "curve_secret_key_file": "keys/server.key_secret"})
    kd = sup.root / "keys"
    for name in ("server", "ops"):
        keys.new_keypair(name, kd)
    sup.config_path.write_text(sup.config_path.read_text()
                               + '[[clients]]\npublic_key_file = "keys/ops.key"\nrole = "admin"\n')
    sup.start()
    assert sup.client.swap("a", "b")["new"] == "b"
    assert sup.model("a")["state"] == "UNLOADED"
    assert json.loads(_tcp_generate(endpoint, kd, "a").stdout)["usage"]["completion_tokens"] >= 1

    assert sup.stop() == 0
    sup.start(wait_ready=False)
    sup.wait_model("b", lambda m: m["state"] == "READY", 60, "b READY after the restart")
    assert sup.model("a")["state"] == "UNLOADED"  # the swapped-out model stays out
    (restored,) = sup.events("model.alias_restored")
    assert (restored["model"], restored["new_model"]) == ("a", "b")
    result = sup.client.complete("a", "Hello", max_tokens=3)  # served by b, not MODEL_NOT_READY
    assert result.usage["completion_tokens"] >= 1
    tcp = _tcp_generate(endpoint, kd, "a")
    assert tcp.returncode == 0, tcp.stdout + tcp.stderr

    # Loading `a` by name takes it back, for good.
    sup.client.load("a")
    sup.wait_model("a", lambda m: m["state"] == "READY", 60, "a READY on its own worker")
    db = sqlite3.connect(sup.state_dir / "store.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM aliases").fetchone() == (0,)
    finally:
        db.close()
    assert sup.stop() == 0
    sup.start()
    assert len(sup.events("model.alias_restored")) == 1  # nothing restored the second time
