"""Operations' rules that need no worker process: the drain refuses every new verb and request, a
verb on an undeclared model is refused before it waits, the model table changes only through
Operations (read-only to everyone else), aliases are restored, dropped and taken back as the store
says, and the control server has a handler for every message type a client may send."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq.asyncio

from protocol import admin as A
from protocol import codec
from protocol import errors as E
from protocol.messages import TO_SUPERVISOR_FROM_CLIENT, GenerateRequest
from supervisor import config as cfg_mod
from supervisor.control.router import Router
from supervisor.control.server import ControlServer
from supervisor.lifecycle.states import ModelState
from supervisor.operations.status import ProcessFigures
from supervisor.operations.verbs import Operations
from supervisor.persistence.store import Store
from supervisor.services import Services

pytestmark = pytest.mark.timeout(30)


def _write_config(tmp_path: Path, *ids: str, canary_timeout_s: float = 60.0, autoload: bool = False) -> Path:
    """A config of models (by default ones that never start by themselves: no worker here)."""
    sections = []
    for model_id in ids:
        (tmp_path / model_id).mkdir(exist_ok=True)
        sections.append(f'[[models]]\nid = "{model_id}"\npath = "{tmp_path / model_id}"\n'
                        f'autoload = {str(autoload).lower()}\n'
                        f'canary = {{ prompt = "Hi", timeout_s = {canary_timeout_s} }}\n')
    path = tmp_path / "lmx.toml"
    path.write_text("\n".join(sections))
    return path


def _services(tmp_path: Path, *ids: str, store: Store | None = None, autoload: bool = False) -> Services:
    config = cfg_mod.load(_write_config(tmp_path, *ids, autoload=autoload))
    return Services(config, store or Store(tmp_path), None, "ipc://unused")


def _ops(tmp_path: Path, *ids: str, store: Store | None = None, autoload: bool = False) -> Operations:
    return Operations(_services(tmp_path, *ids, store=store, autoload=autoload),
                      ProcessFigures(tmp_path, safe_mode=False))


def _run(coro):
    return asyncio.run(coro)


def test_after_the_drain_every_verb_and_request_is_refused_and_nothing_starts(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops = _ops(tmp_path, "a", "b", autoload=True)
        router = Router(ops)
        ops.drain()
        assert ops.draining and ops.status()[0]["draining"] is True
        with pytest.raises(E.ShuttingDown):
            ops.load("a")
        for verb in (ops.unload("a"), ops.release("a"), ops.rollback("a", None), ops.repair("a"),
                     ops.swap("a", "b"), ops.reload(), ops.probe(str(tmp_path / "a"))):
            with pytest.raises(E.ShuttingDown):
                await verb
        with pytest.raises(E.ShuttingDown):
            router.admit("client", GenerateRequest("r1", "a", prompt="hi"))
        ops.autostart_all("autoload")  # nothing starts while draining, whatever its config wants
        assert all(r.state is ModelState.UNLOADED for r in ops.models.values())

    _run(scenario())


def test_a_verb_on_an_undeclared_model_is_refused_before_it_waits(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops = _ops(tmp_path, "a")
        with pytest.raises(E.UnknownModel):
            ops.load("nope")  # at once: not a coroutine that fails later
        with pytest.raises(E.UnknownModel):
            ops.unload("nope")
        for verb in (ops.release("nope"), ops.rollback("nope", None), ops.repair("nope"), ops.swap("a", "nope")):
            with pytest.raises(E.UnknownModel):
                await verb
        for call in (lambda: ops.history("nope", 5), lambda: ops.verify("nope"),
                     lambda: ops.clear_prefix_cache("nope")):
            with pytest.raises(E.UnknownModel):
                call()
        with pytest.raises(E.BadRequest, match="two different"):
            await ops.swap("a", "a")
        with pytest.raises(E.BadRequest, match="old and the new"):
            await ops.swap("a", "")
        with pytest.raises(E.BadRequest, match="needs a path"):
            await ops.probe("")

    _run(scenario())


def test_the_table_is_read_only_outside_operations_and_a_reload_rewrites_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops = _ops(tmp_path, "a", "b")
        with pytest.raises(TypeError):
            ops.models["x"] = ops.models["a"]  # type: ignore[index]
        with pytest.raises(TypeError):
            ops.aliases["x"] = "a"  # type: ignore[index]
        before_a, before_b = ops.models["a"], ops.models["b"]
        _write_config(tmp_path, "b", "c", canary_timeout_s=61.0)  # a removed, b changed, c added
        summary = await ops.reload()
        assert summary == {"added": ["c"], "removed": ["a"], "changed": ["b"]}
        assert sorted(ops.models) == ["b", "c"]
        assert ops.models["b"] is not before_b and before_a.state is ModelState.UNLOADED
        assert ops.config.models[0].canary.timeout_s == 61.0  # the one current config
        with pytest.raises(E.UnknownModel):
            ops.runtime("a")

    _run(scenario())


def test_aliases_are_restored_dropped_and_taken_back_by_a_load(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Store(tmp_path)
        store.set_alias("old", "b")  # a swap that outlived a restart
        store.set_alias("gone", "undeclared")  # its successor is no longer in the config
        ops = _ops(tmp_path, "old", "b", store=store)
        assert dict(ops.aliases) == {"old": "b"}
        assert store.aliases() == {"old": "b"}
        assert ops.runtime("old") is ops.models["b"]  # requests for OLD go to its successor
        assert ops.history("old", 10) == []  # a swapped-out name still has its own history
        load = ops.load("old")  # loading a swapped-out model takes its name back, at once
        assert dict(ops.aliases) == {} and store.aliases() == {}
        assert ops.runtime("old") is ops.models["old"]
        load.close()  # the start itself is not this test's (it would spawn a worker)

    _run(scenario())


def test_the_checks_the_router_leaves_to_decode_are_made_there() -> None:
    # The Router no longer checks max_tokens >= 1 or timeout_s > 0: every request reaches it
    # decoded, and decode refuses both.
    for bad in ({"max_tokens": 0}, {"timeout_s": 0}, {"timeout_s": -1.0}):
        frames = codec.encode(GenerateRequest("r1", "m", prompt="hi", **bad))
        with pytest.raises(E.BadRequest):
            codec.decode(frames, TO_SUPERVISOR_FROM_CLIENT)


def test_the_router_refuses_by_supervisor_state_only(tmp_path: Path) -> None:
    ops = _ops(tmp_path, "a")
    router = Router(ops)
    with pytest.raises(E.UnknownModel):
        router.admit("c", GenerateRequest("r1", "nope", prompt="hi"))
    with pytest.raises(E.BadRequest, match="exactly one"):
        router.admit("c", GenerateRequest("r1", "a"))
    runtime, req = router.admit("c", GenerateRequest("r1", "a", prompt="hi"))
    assert runtime is ops.models["a"] and req.timeout_s == ops.config.supervisor.request_timeout_s
    router.add(("c", "r1"), runtime, "w1")
    with pytest.raises(E.BadRequest, match="already in flight"):
        router.admit("c", GenerateRequest("r1", "a", prompt="hi"))


def test_the_control_server_has_one_handler_for_every_client_message_type(tmp_path: Path) -> None:
    async def scenario() -> None:
        services = _services(tmp_path, "a")
        ops = Operations(services, ProcessFigures(tmp_path, safe_mode=False))
        ctx = zmq.asyncio.Context()
        server = ControlServer(ctx, f"ipc://{tmp_path}/c.sock", tmp_path / "c.sock", ops, Router(ops), services)
        try:
            # Every type decode can hand it, and no other: a new message type without a handler
            # fails here, not as a silent drop on the wire.
            assert set(server._handlers) == set(TO_SUPERVISOR_FROM_CLIENT.values())
            assert set(server._admin_ops) == set(A.REQUESTS)
        finally:
            server.close()
            ctx.term()

    _run(scenario())
