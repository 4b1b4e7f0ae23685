"""A peer places ranks; it never runs commands on the member (issue 23, finding 2). A real member
supervisor (CURVE, the owner's key with role "peer") gets RankPlace messages straight from a
client holding that key, as a hostile owner would send them: an environment beyond MLX's own
variables, a group or model name that is not one path component, Init fields that are not the
owner's to decide, a model path outside the member's model_roots. Each is refused BAD_REQUEST (the
path SNAPSHOT_NOT_FOUND) naming the field, logged as peer.rank_refused; no rank is spawned and
nothing is written outside the state dir. A well-formed place still starts its rank."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from protocol.client import SupervisorClient
from protocol.keys import new_keypair
from protocol.messages import Error, Init
from protocol.peer import RankEnd, RankPlace, RankReport
from supervisor.admission import compat
from tests.harness import RunningSupervisor, wait_until, workers_of
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    inside = tmp_path_factory.mktemp("roots")
    outside = tmp_path_factory.mktemp("elsewhere")
    snap = write_tiny_llama(inside / "snap")
    other = write_tiny_llama(outside / "snap")
    (inside / "link").symlink_to(other)
    return {"root": inside, "snap": snap, "outside": other}


@pytest.fixture(scope="module")
def member(tmp_path_factory: pytest.TempPathFactory, roots: dict[str, Path]):
    kd = tmp_path_factory.mktemp("keys")
    new_keypair("a", kd)
    new_keypair("b", kd)
    port = _free_port()
    sup = RunningSupervisor(tmp_path_factory.mktemp("member"), [], supervisor={
        "listen": f"tcp://127.0.0.1:{port}", "curve_secret_key_file": str(kd / "b.key_secret"),
        "model_roots": [str(roots["root"])]})
    sup.config_path.write_text(sup.config_path.read_text()
                               + f'[[clients]]\npublic_key_file = "{kd / "a.key"}"\nrole = "peer"\n')
    sup.start()
    sup.endpoint, sup.keydir = f"tcp://127.0.0.1:{port}", kd
    yield sup
    sup.cleanup()


def _place(roots: dict[str, Path], **over) -> RankPlace:
    port = _free_port()
    fields = {"request_id": os.urandom(8).hex(), "group": f"snap-{os.urandom(4).hex()}", "model": "snap",
              "revision": "r1", "path": str(roots["snap"]), "rank": 1, "size": 2, "backend": "ring",
              "parallel": "", "env": {"MLX_RANK": "1", "MLX_WORLD_SIZE": "2"},
              "hostfile": [[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]],
              "versions": compat.versions(), **over}
    # As an owner fills it (remoterank.place_message): its numbers, and the place's model, revision, path.
    init = Init(fields["model"], fields["revision"], fields["path"], 0.0, 0.0, memory_limit_bytes=0,
                max_batch_size=1, prefill_step_size=512, stream_interval_s=0.0, context_tokens=256)
    return RankPlace(**fields, init=init)


def _send(member: RunningSupervisor, *msgs: RankPlace, end: bool = False) -> list:
    """The first answer to each place (an Error, or the rank's first report); `end`: RankEnd after.
    Sent as they are, unchecked, as a hostile owner would (the client would refuse a wrong type)."""
    async def run() -> list:
        async with SupervisorClient(member.endpoint, client_cert=member.keydir / "a.key_secret",
                                    server_key_file=member.keydir / "b.key", timeout_s=15) as client:
            out = []
            for msg in msgs:
                async with await client.connection.replies(msg.request_id) as replies:
                    await client.connection.send(msg)
                    out.append(await asyncio.wait_for(replies.get(), 15))
                if end:
                    await client.connection.call(RankEnd(os.urandom(8).hex(), msg.group, "test over"), 10)
            return out

    return asyncio.run(run())


def _refused(member: RunningSupervisor, place: RankPlace, code: str, *words: str,
             event: str = "peer.rank_refused") -> Error:
    """`event`: the log line of the refusal; a field of the wrong type is the codec's (client.bad_request)."""
    before = len(member.events(event))
    (err,) = _send(member, place)
    assert isinstance(err, Error) and err.code == code, err
    assert all(w in err.message for w in words), err.message
    wait_until(lambda: len(member.events(event)) > before, 5, f"the {event} event")
    assert not workers_of(member.state_dir)
    return err


def test_a_well_formed_place_starts_its_rank(member: RunningSupervisor, roots: dict[str, Path]) -> None:
    place = _place(roots)
    (report,) = _send(member, place, end=True)
    assert isinstance(report, RankReport) and report.kind == "placed", report
    spawned = [e for e in member.events("worker.spawned") if e.get("worker_pid") == report.pid]
    assert spawned, member.events("worker.spawned")
    wait_until(lambda: not workers_of(member.state_dir), 15, "the ended rank gone")


@pytest.mark.parametrize("name, value", [("PYTHONPATH", "marker"), ("LD_PRELOAD", "/nonexistent/evil.so"),
                                         ("PYTHONWARNINGS", "error::Warning:os"), ("MLX_MPI_LIBNAME", "libevil.so"),
                                         ("MLX_HOSTFILE", "/etc/passwd"), ("PYTHONSTARTUP", "x")])
def test_a_variable_beyond_mlx_own_is_refused_and_no_interpreter_sees_it(
        member: RunningSupervisor, roots: dict[str, Path], tmp_path: Path, name: str, value: str) -> None:
    """PYTHONPATH names a directory whose sitecustomize.py writes a marker: had any interpreter
    started with it (the rank's), the marker would be there."""
    marker = tmp_path / "ran"
    if value == "marker":
        code = tmp_path / "code"
        code.mkdir()
        (code / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
        value = str(code)
    spawned = len(member.events("worker.spawned"))
    _refused(member, _place(roots, env={"MLX_RANK": "1", "MLX_WORLD_SIZE": "2", name: value}),
             "BAD_REQUEST", f"env.{name}", "not a variable a peer may set")
    assert len(member.events("worker.spawned")) == spawned
    assert not marker.exists()


@pytest.mark.parametrize("env", [{"MLX_RANK": "0"}, {"MLX_RANK": "1; rm -rf /"}, {"MLX_WORLD_SIZE": "2\n"},
                                 {"MLX_JACCL_COORDINATOR": "$(id):1"}, {"MLX_RANK": 1}])
def test_an_mlx_variable_is_checked_against_the_place(member: RunningSupervisor, roots: dict[str, Path],
                                                      env: dict) -> None:
    _refused(member, _place(roots, env={"MLX_RANK": "1", "MLX_WORLD_SIZE": "2", **env}), "BAD_REQUEST", "env.MLX_")


@pytest.mark.parametrize("group", ["../../x", "..", "a/b", "", "x\x00y", "g" * 300, ".hidden"])
def test_a_group_name_that_is_not_one_path_component_is_refused(member: RunningSupervisor, roots: dict[str, Path],
                                                               group: str) -> None:
    around = member.state_dir.parent
    before = set(around.rglob("*"))
    _refused(member, _place(roots, group=group), "BAD_REQUEST", "group", "not a safe name")
    created = {p for p in set(around.rglob("*")) - before if member.state_dir not in p.parents}
    assert not created, created
    assert not list(member.state_dir.parent.parent.glob("x.rank*"))


def test_a_model_id_that_is_not_one_path_component_is_refused(member: RunningSupervisor,
                                                              roots: dict[str, Path]) -> None:
    _refused(member, _place(roots, model="../evil"), "BAD_REQUEST", "model", "not a safe name")


@pytest.mark.parametrize("init", [{"prefix_cache_dir": "/tmp/owner-chosen"}, {"path": "/elsewhere"},
                                  {"group": {}}, {"memory_limit_bytes": -1}, {"context_tokens": "4096"}])
def test_init_fields_the_owner_does_not_decide_are_refused(member: RunningSupervisor, roots: dict[str, Path],
                                                           init: dict) -> None:
    place = _place(roots)
    event = "client.bad_request" if init == {"context_tokens": "4096"} else "peer.rank_refused"
    _refused(member, dataclasses.replace(place, init=dataclasses.replace(place.init, **init)), "BAD_REQUEST",
             "init.", event=event)


@pytest.mark.parametrize("where", ["outside", "link", "dotdot"])
def test_a_model_path_outside_the_member_roots_is_refused(member: RunningSupervisor, roots: dict[str, Path],
                                                          where: str) -> None:
    path = {"outside": str(roots["outside"]), "link": str(roots["root"] / "link"),
            "dotdot": f"{roots['root']}/../{roots['outside'].parent.name}/snap"}[where]
    _refused(member, _place(roots, path=path), "SNAPSHOT_NOT_FOUND", "model_roots")


@pytest.mark.parametrize("over", [{"backend": "mpi"}, {"parallel": "data"}, {"rank": 2}, {"size": 10_000},
                                  {"hostfile": [["127.0.0.1:1; touch x"]]}, {"hostfile": [["a:1"]] * 3}])
def test_the_place_shape_is_checked(member: RunningSupervisor, roots: dict[str, Path], over: dict) -> None:
    _refused(member, _place(roots, **over), "BAD_REQUEST", "rank_place:")


def test_a_jaccl_devices_path_that_is_not_a_regular_file_is_refused(member: RunningSupervisor,
                                                                    roots: dict[str, Path], tmp_path: Path) -> None:
    fifo = tmp_path / "devices"
    os.mkfifo(fifo)  # opening it to read would block the member's event loop forever
    env = {"MLX_RANK": "1", "MLX_WORLD_SIZE": "2", "MLX_IBV_DEVICES": str(fifo)}
    _refused(member, _place(roots, backend="jaccl", hostfile=[], env=env), "BAD_REQUEST", "MLX_IBV_DEVICES")
    assert member.client.status() is not None  # the member still answers

