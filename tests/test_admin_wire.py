"""The typed admin wire: one struct per operation, dispatched by type; the legacy AdminRequest of
older clients still served by the same handlers; status keeps exactly the keys the LMX server reads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol import admin as A
from protocol import codec
from protocol import errors as E
from protocol import messages as M
from protocol.client import SupervisorClient
from protocol.states import ModelState, ModelStatus
from supervisor.control import auth
from tests.harness import RunningSupervisor

# What one model's status carries today (the LMX server and `lmxctl status --json` read these).
MODEL_STATUS_KEYS = {
    "id", "state", "autoload", "pinned", "idled_out", "wanted", "revision", "configured_revision",
    "lkg_revision", "worker_pid", "restarts", "failures_in_window", "last_error", "quarantined",
    "retry_after_s", "ready_for_s", "queued", "active", "phase", "memory", "prefix_cache", "canary",
    "group",  # added with groups (docs/distributed.md): None for a model served by one worker
    "kind",  # added with kinds (issue 25): "generate" or "embed"
}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("adminwire"), [{"id": "m", "path": str(tiny_model)}]).start()
    yield s
    s.stop()


def _ask(sup: RunningSupervisor, *msgs: M.Message) -> list[Any]:
    """Each message's reply, through the client library's own call path."""
    async def run() -> list[Any]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            out = []
            for msg in msgs:
                try:
                    out.append(await client.connection.call(msg, 30))
                except E.LmxError as exc:
                    out.append(exc)
            return out
    return asyncio.run(run())


def test_status_keeps_exactly_todays_keys_and_states(sup: RunningSupervisor) -> None:
    status = sup.client.status()
    (model,) = status["models"]
    assert set(model) == MODEL_STATUS_KEYS
    assert ModelStatus.from_dict(model).to_dict() == model
    assert ModelStatus.from_dict(model).model_state() is ModelState.READY
    assert model["state"] == ModelState.READY.value and isinstance(model["state"], str)


def test_a_legacy_admin_request_gets_an_ack_from_the_same_handler_as_the_typed_one(sup: RunningSupervisor) -> None:
    legacy_verify, typed_verify, legacy_compat, typed_compat, legacy_clear, typed_clear = _ask(
        sup, A.AdminRequest("l1", "verify", "m"), A.VerifyRequest("t1", "m"),
        A.AdminRequest("l2", "compat"), A.CompatRequest("t2"),
        A.AdminRequest("l3", "cache-clear", "m"), A.CacheClearRequest("t3", "m"))
    assert isinstance(legacy_verify, M.Ack) and isinstance(typed_verify, A.VerifyReply)
    assert legacy_verify.detail == typed_verify.detail() and set(legacy_verify.detail) == {"path", "findings"}
    assert isinstance(legacy_compat, M.Ack) and legacy_compat.detail == typed_compat.detail()
    assert isinstance(legacy_clear, M.Ack) and legacy_clear.detail == typed_clear.detail()
    assert legacy_clear.detail["models"] == ["m"]


def test_legacy_and_typed_refusals_are_the_same_typed_errors(sup: RunningSupervisor) -> None:
    unknown_op, legacy_probe, typed_probe, legacy_verify, typed_verify = _ask(
        sup, A.AdminRequest("l1", "defragment"), A.AdminRequest("l2", "probe"), A.ProbeRequest("t2", ""),
        A.AdminRequest("l3", "verify"), A.VerifyRequest("t3", "nope"))
    assert isinstance(unknown_op, E.BadRequest)
    assert isinstance(legacy_probe, E.BadRequest) and isinstance(typed_probe, E.BadRequest)
    assert isinstance(legacy_verify, E.UnknownModel) and isinstance(typed_verify, E.UnknownModel)


def test_the_library_reads_typed_replies_as_the_dicts_it_always_returned(sup: RunningSupervisor) -> None:
    client = sup.client
    assert "lmx_" in client.metrics()
    assert set(client.verify("m")) == {"path", "findings"}
    assert set(client.clear_cache()) == {"models", "files", "bytes"}


def test_every_admin_op_has_one_typed_request_and_each_decodes_strictly() -> None:
    assert set(A.BY_OP) == {"reload", "release", "rollback", "swap", "probe", "repair", "verify", "compat",
                            "metrics", "cache-clear"}
    body = msgpack.packb(["verify", {"request_id": "r", "model": "m", "op": "verify"}])
    with pytest.raises(codec.InvalidMessage, match="unknown field"):
        codec.decode([codec.PROTOCOL, body], M.TO_SUPERVISOR_FROM_CLIENT)
    body = msgpack.packb(["verify", ["r", "m"]])  # maps, never arrays
    with pytest.raises(E.BadRequest):
        codec.decode([codec.PROTOCOL, body], M.TO_SUPERVISOR_FROM_CLIENT)
    with pytest.raises(codec.InvalidMessage):
        codec.decode(codec.encode(A.ProbeRequest("r", "/x\x00y")), M.TO_SUPERVISOR_FROM_CLIENT)


@pytest.mark.parametrize("op", sorted(A.BY_OP))
def test_a_role_decides_alike_for_the_typed_and_the_legacy_request(op: str) -> None:
    legacy = A.AdminRequest("r", op, "m", path="/p", target="n")
    typed = legacy.typed()
    assert auth.op_name(typed) == op
    for role in ("read", "admin", None):
        assert auth.allowed(role, typed) == auth.allowed(role, legacy)
    assert A.legacy(typed).typed() == typed
