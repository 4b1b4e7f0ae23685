"""Groups across hosts, on one machine (docs/distributed.md): two supervisors with their own state
dirs and ports stand for two hosts. The owner ("local") runs rank 0; the member ("b") runs rank 1
for it over the peer link (CURVE, role "peer"); the ranks' ring runs over 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.syncclient import SyncSupervisorClient
from protocol.keys import new_keypair
from tests.harness import process_gone, wait_until, workers_of
from tests.snapshots import write_tiny_qwen2
from tests.test_groups import PROMPT, fault_mid_stream, sharp_llama  # noqa: F401 (a fixture)

LINK = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5, "link_timeout_s": 2.0}


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", 0))
                port = a.getsockname()[1]
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two free ports in a row")


def _append(sup, toml: str) -> None:
    sup.config_path.write_text(sup.config_path.read_text() + toml)


def make_pair(make_supervisor, tmp_path: Path, model: Path, group: dict | None = None):
    """A member ("b", with the owner's key as a peer client) and an owner whose model "big" is a
    group of rank 0 here and rank 1 on b, beside "one", the same snapshot in one worker."""
    kd = tmp_path / "keys"
    new_keypair("a", kd)
    new_keypair("b", kd)
    b_port = _free_port_pair()
    member = make_supervisor([], supervisor={**LINK, "listen": f"tcp://127.0.0.1:{b_port}",
                                             "curve_secret_key_file": str(kd / "b.key_secret"),
                                             "model_roots": [str(model.parent)]})
    _append(member, f'[[clients]]\npublic_key_file = "{kd / "a.key"}"\nrole = "peer"\n')
    member.start()
    owner = make_supervisor([{"id": "big", "path": str(model),
                              "group": {"hosts": ["local", "b"], "ring_port": _free_port_pair(), **(group or {})}},
                             {"id": "one", "path": str(model), "max_batch_size": 1}],
                            supervisor=LINK, restart={"quarantine_after": 100, "backoff_max_s": 1.0})
    _append(owner, f'[[peers]]\nname = "b"\nendpoint = "tcp://127.0.0.1:{b_port}"\n'
                   f'server_key_file = "{kd / "b.key"}"\nclient_cert = "{kd / "a.key_secret"}"\n')
    owner.start(timeout_s=90)
    owner.keydir, owner.member_port = kd, b_port
    return owner, member


@pytest.fixture
def pair(make_supervisor, tmp_path: Path, sharp_llama: Path):  # noqa: F811
    return make_pair(make_supervisor, tmp_path, sharp_llama)


def ranks(owner) -> list[dict]:
    return owner.model("big")["group"]


def _ready_again(owner, before: list[dict]) -> dict:
    return owner.wait_model("big", lambda m: m["state"] == "READY" and m["group"][0]["pid"] != before[0]["pid"],
                            90, "READY again on fresh ranks")


@pytest.mark.timeout(150)
def test_a_group_across_two_supervisors_serves_and_a_remote_rank_kill_fails_it_as_one(pair) -> None:
    owner, member = pair
    group = ranks(owner)
    assert [(r["rank"], r["host"]) for r in group] == [(0, "local"), (1, "b")]
    assert workers_of(member.state_dir) == {group[1]["pid"]}  # rank 1 is the member's worker
    for kwargs in ({"max_tokens": 12}, {"max_tokens": 10, "stop": ["e"]}):
        assert owner.client.complete("big", PROMPT, **kwargs).text == owner.client.complete("one", PROMPT, **kwargs).text
    # The peer role may place ranks and nothing else.
    with SyncSupervisorClient(f"tcp://127.0.0.1:{owner.member_port}", client_cert=owner.keydir / "a.key_secret",
                              server_key_file=owner.keydir / "b.key") as as_peer:
        with pytest.raises(E.Unauthorized):
            as_peer.status()
    # SIGKILL of the member's rank: the member's verdict, named with the rank and the host.
    exc, latency_s = fault_mid_stream(owner, lambda: os.kill(group[1]["pid"], signal.SIGKILL))
    assert exc.code.code == "WORKER_CRASHED" and (exc.details["rank"], exc.details["host"]) == (1, "b"), exc
    assert latency_s < 1.0 + 1.0, f"{latency_s:.2f}s"
    wait_until(lambda: all(process_gone(r["pid"]) for r in group), 5, "every rank of the failed group gone")
    after = _ready_again(owner, group)["group"]
    crash = owner.client.history("big")[0]
    assert (crash["rank"], crash["host"], crash["code"]) == (1, "b", "WORKER_CRASHED")
    assert owner.client.complete("big", PROMPT, max_tokens=4).usage["completion_tokens"] == 4
    # Unload acts on the group: the member's rank ends too.
    assert owner.client.unload("big")["state"] == "UNLOADED"
    wait_until(lambda: not workers_of(member.state_dir), 10, "the member's rank ended with its group")
    assert all(process_gone(r["pid"]) for r in after)


@pytest.mark.timeout(150)
def test_a_pipeline_group_across_two_supervisors_reads_only_its_layers(make_supervisor, tmp_path: Path) -> None:
    """qwen2 has mlx-lm's pipeline support; its weights come in two files with an index, and each
    rank reads only the files that hold its layers."""
    qwen = write_tiny_qwen2(tmp_path / "models" / "qwen2")
    owner, member = make_pair(make_supervisor, tmp_path, qwen, {"parallel": "pipeline"})
    for kwargs in ({"max_tokens": 12}, {"max_tokens": 8, "temperature": 0.7, "seed": 3}):
        assert owner.client.complete("big", PROMPT, **kwargs).text == owner.client.complete("one", PROMPT, **kwargs).text
    assert [r["host"] for r in ranks(owner)] == ["local", "b"]


@pytest.mark.timeout(240)
def test_losing_either_supervisor_leaves_no_rank_and_the_member_rejoins(pair) -> None:
    """The member stopped (a silent link), then killed: PEER_UNAVAILABLE within link_timeout_s + 1 s,
    every rank gone, READY again once it is back. Then the owner killed: no rank on either host."""
    owner, member = pair
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        before = ranks(owner)

        def fault() -> None:  # SIGSTOP: the whole host freezes, the member's rank with it
            member.proc.send_signal(sig)
            if sig == signal.SIGSTOP:
                os.kill(before[1]["pid"], signal.SIGSTOP)

        exc, latency_s = fault_mid_stream(owner, fault)
        assert exc.code.code == "PEER_UNAVAILABLE" and (exc.details["rank"], exc.details["host"]) == (1, "b"), exc
        assert latency_s < LINK["link_timeout_s"] + 1.0, f"{latency_s:.2f}s"
        wait_until(lambda: process_gone(before[0]["pid"]), 5, "the owner's rank gone")
        if sig == signal.SIGSTOP:
            member.proc.send_signal(signal.SIGCONT)
            os.kill(before[1]["pid"], signal.SIGCONT)
        else:  # its rank ends with it (the death pipe), and the member comes back
            member.proc.wait(10)
            member.start()
        wait_until(lambda: process_gone(before[1]["pid"]), 10, "the member's old rank gone")
        after = _ready_again(owner, before)
        assert after["group"][1]["host"] == "b" and after["group"][1]["pid"] != before[1]["pid"]
        assert owner.client.complete("big", PROMPT, max_tokens=4).usage["completion_tokens"] == 4
        assert workers_of(member.state_dir) == {after["group"][1]["pid"]}
    assert [c["code"] for c in owner.client.history("big")] == ["PEER_UNAVAILABLE"] * 2
    # SIGKILL of the owner: its rank ends at once (the death pipe); the member ends the rank it ran
    # for it as soon as a report finds the owner's connection gone.
    group = ranks(owner)
    owner.client.unload("one")  # a plain worker waits out its orphan grace for adoption: not this test's
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait(10)
    wait_until(lambda: process_gone(group[0]["pid"]), 3, "the owner's rank gone with it")
    wait_until(lambda: not workers_of(member.state_dir), 5, "the member's rank ended")
    assert member.events("peer.owner_gone")
    assert member.status()["supervisor"]["pid"] == member.proc.pid  # the member itself is fine
