"""A role belongs to the key a client proved, not to its name: after a reload that revokes a key and
gives its name to another key, a connection still open with the revoked key gets nothing, and the
new key gets its own role. A real supervisor on loopback tcp, real CURVE clients."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from protocol import errors as E
from protocol import keys
from protocol.syncclient import SyncSupervisorClient
from supervisor.control.auth import key_digest
from tests.harness import RunningSupervisor

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clients_toml(*clients: tuple[str, str, str]) -> str:
    return "".join(f'[[clients]]\nname = "{n}"\npublic_key_file = "keys/{f}.key"\nrole = "{r}"\n'
                   for n, f, r in clients)


def test_a_revoked_key_whose_name_is_reused_keeps_no_role_on_its_open_connection(
        tmp_path: Path, tiny_model: Path) -> None:
    kd = tmp_path / "keys"
    for name in ("server", "alice", "bob", "carol"):
        keys.new_keypair(name, kd)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    sup = RunningSupervisor(tmp_path, [{"id": "m", "path": str(tiny_model)}],
                            supervisor={"listen": endpoint, "curve_secret_key_file": "keys/server.key_secret"})
    base = sup.config_path.read_text()
    sup.config_path.write_text(base + _clients_toml(("alice", "alice", "read"), ("bob", "bob", "admin")))

    def connect(who: str) -> SyncSupervisorClient:
        return SyncSupervisorClient(endpoint, server_key_file=kd / "server.key",
                                    client_cert=kd / f"{who}.key_secret", timeout_s=15)

    old = bob = new = None
    try:
        sup.start()
        old, bob = connect("alice"), connect("bob")
        assert old.status()["models"][0]["state"] == "READY"
        with pytest.raises(E.Unauthorized):
            old.reload()  # read only
        # alice's key is revoked; the name "alice" now belongs to carol's key, with admin.
        sup.config_path.write_text(base + _clients_toml(("alice", "carol", "admin"), ("bob", "bob", "admin")))
        assert bob.reload() is not None
        with pytest.raises(E.Unauthorized, match="no longer allowed"):
            old.status()
        with pytest.raises(E.Unauthorized):
            old.reload()
        new = connect("carol")
        assert new.reload() is not None  # the key that holds the name now has its role
    finally:
        for c in (old, bob, new):
            if c is not None:
                c.close()
        sup.cleanup()
    denied = sup.events("auth.denied")
    revoked = key_digest(keys.load_public(kd / "alice.key"))
    assert any(e["client"] is None and e["key_sha256"] == revoked for e in denied), denied
