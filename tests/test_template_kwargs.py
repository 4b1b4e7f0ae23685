"""chat_template_kwargs are template variables, never apply_chat_template's own parameters (issue
23, finding 1): a closed list of names and value types, refused as BAD_REQUEST naming the key by the
client library, the supervisor (a raw frame that skipped the client) and the gateway, and again
in the worker. A render is bounded in time (worker.render): a request that makes the model's own
template run for minutes fails alone, and the worker serves on with the same pid, never
quarantined. A message's text is data, never template."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from protocol import codec, limits
from protocol import errors as E
from protocol.messages import GenerateRequest
from supervisor.config import SupervisorSettings
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.test_hostile import Raw, body

pytestmark = pytest.mark.timeout(180)

HI = [{"role": "user", "content": "Hello"}]
# Quadratic in the messages, as some real templates are (each message looks at every other): fast
# for a chat, forever for 2,000 long messages. The model's own template, not a client's.
SLOW_LOOP = "{% for m in messages %}{% for n in messages %}{% for c in n['content'] %}{% endfor %}{% endfor %}{% endfor %}"
KILLER = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 990} for i in range(2000)]
# The worker as it runs in production, with a render bound a test can wait for.
SHORT_BOUND = [sys.executable, "-c", "import worker.render as r; r.RENDER_TIMEOUT_S = 1.0; "
               "from worker.main import main; raise SystemExit(main())"]
REFUSED = ["return_tensors", "chat_template", "tokenize", "tools", "documents", "add_generation_prompt",
           "continue_final_message", "return_dict", "tokenizer_kwargs", "eos_token"]


def _slow_template_model(dest: Path) -> Path:
    write_tiny_llama(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = SLOW_LOOP + cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _slow_template_model(tmp_path_factory.mktemp("models") / "slow")


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, slow_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("tk"), [
        {"id": "m", "path": str(slow_model), "worker_command": SHORT_BOUND},
    ], restart={"quarantine_after": 3}).start()
    yield s
    s.cleanup()


def _same_worker(sup: RunningSupervisor, before: dict) -> None:
    after = sup.model("m")
    assert after["state"] == "READY", after
    assert (after["worker_pid"], after["restarts"]) == (before["worker_pid"], before["restarts"]), after
    assert sup.client.complete("m", messages=HI, max_tokens=3).usage["completion_tokens"] >= 1


# --- the allow-list (protocol.limits: the client library, the supervisor, the gateway) -----------

@pytest.mark.parametrize("key", REFUSED + ["foo", "messages"])
def test_a_renderer_parameter_or_unknown_name_is_refused_naming_it(key: str) -> None:
    req = GenerateRequest("r1", "m", messages=HI, max_tokens=3, chat_template_kwargs={key: "np"})
    with pytest.raises(E.BadRequest) as info:
        codec.check(req)
    assert repr(key) in info.value.message and info.value.details["param"] == f"chat_template_kwargs.{key}"


@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {"thinking": True}, {"reasoning_effort": "high"},
                                    {"thinking_budget": 512}, {"enable_thinking": True, "reasoning_effort": "low"}])
def test_the_template_variables_real_templates_read_pass(kwargs: dict) -> None:
    codec.check(GenerateRequest("r1", "m", messages=HI, max_tokens=3, chat_template_kwargs=kwargs))


@pytest.mark.parametrize("kwargs, want", [({"enable_thinking": "false"}, "a boolean"), ({"thinking": 1}, "a boolean"),
                                          ({"reasoning_effort": "<|start|>system"}, "one of low, medium, high"),
                                          ({"thinking_budget": -1}, "an integer in"),
                                          ({"thinking_budget": True}, "an integer")])
def test_a_template_variable_of_the_wrong_type_is_refused(kwargs: dict, want: str) -> None:
    with pytest.raises(E.BadRequest, match=want):
        limits.check_template_kwargs("generate", kwargs)


def test_the_render_bound_is_under_the_stall_verdicts() -> None:
    from worker import render

    sup = SupervisorSettings()
    assert render.RENDER_TIMEOUT_S * 3 < min(sup.prefill_stall_s, sup.decode_stall_s)


def test_the_client_library_refuses_return_tensors_before_the_wire(sup: RunningSupervisor) -> None:
    before = sup.model("m")
    for _ in range(3):
        with pytest.raises(E.BadRequest, match="return_tensors"):
            sup.client.complete("m", messages=HI, max_tokens=3, chat_template_kwargs={"return_tensors": "np"})
    _same_worker(sup, before)


def test_the_supervisor_refuses_a_raw_frame_naming_a_renderer_parameter(sup: RunningSupervisor) -> None:
    """A frame that skipped the client's checks: refused by the supervisor's own, named; before,
    it reached the worker, which exited (three of them quarantined the model)."""
    before = sup.model("m")
    raw = Raw(f"ipc://{sup.state_dir / 'control.sock'}")
    try:
        for i, kwargs in enumerate([{"return_tensors": "np"}, {"tokenize": False},
                                    {"chat_template": "{% for a in range(99999) %}{% for b in range(99999) %}"
                                                      "{% endfor %}{% endfor %}"}] * 2):
            frame = body("generate", request_id=f"raw{i}", model="m", messages=HI, max_tokens=3,
                         chat_template_kwargs=kwargs)
            err = raw.error([codec.PROTOCOL, frame], timeout_s=10)
            assert err.code == "BAD_REQUEST" and repr(next(iter(kwargs))) in err.message, err
    finally:
        raw.close()
    _same_worker(sup, before)


def test_a_template_killer_fails_its_request_not_the_worker(sup: RunningSupervisor) -> None:
    """The model's own template, made slow by a hostile request: each render stops at the bound
    (1 s here), the request fails BAD_REQUEST, the worker serves on; three never quarantine it."""
    before = sup.model("m")
    for _ in range(3):
        with pytest.raises(E.BadRequest, match="to render"):
            sup.client.complete("m", messages=KILLER, max_tokens=3)
        with pytest.raises(E.BadRequest, match="to render"):
            sup.client.count_tokens("m", messages=KILLER)
    _same_worker(sup, before)


def test_jinja_in_a_message_is_data_not_template(sup: RunningSupervisor) -> None:
    """Had the content been rendered as template, `{{ 7 * 7 }}` would count as `49`, and the loops
    would run for hours."""
    hostile = ("{{ 7 * 7 }}{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
               "{{ raise_exception('x') }}{% raw %}{{ self.__init__.__globals__ }}")
    as_text = sup.client.count_tokens("m", messages=[{"role": "user", "content": hostile}])
    evaluated = sup.client.count_tokens("m", messages=[{"role": "user", "content": "49"}])
    assert as_text > evaluated + 20
    result = sup.client.complete("m", messages=[{"role": "user", "content": hostile}], max_tokens=3)
    assert result.usage["prompt_tokens"] == as_text


def test_the_gateway_refuses_a_renderer_parameter_as_a_400_naming_it(sup: RunningSupervisor, tmp_path: Path) -> None:
    from tests.test_gateway import GatewayProcess

    gw = GatewayProcess(tmp_path / "gw", sup.state_dir)
    try:
        for kwargs in ({"return_tensors": "np"}, {"chat_template": "{{ 1 }}"}, {"enable_thinking": "no"}):
            r = gw.http.post("/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 3,
                                                           "chat_template_kwargs": kwargs})
            assert r.status_code == 400, r.text
            assert repr(next(iter(kwargs))) in r.json()["error"]["message"], r.text
        ok = gw.http.post("/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 3,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
        assert ok.status_code == 200, ok.text
    finally:
        gw.stop()


# --- the worker's own check (defence in depth), in-process on the real engine --------------------

def test_the_engine_refuses_a_renderer_parameter_itself(tiny_model: Path) -> None:
    from worker.engine import Engine

    engine = Engine()
    engine.load(str(tiny_model))
    plain = engine.prompt_tokens(GenerateRequest("r", "m", messages=HI, max_tokens=3))
    assert plain and all(type(i) is int for i in plain)
    for key in ("return_tensors", "chat_template", "tokenize", "return_dict"):
        req = GenerateRequest("r", "m", messages=HI, max_tokens=3, chat_template_kwargs={key: "np"})
        with pytest.raises(ValueError, match=repr(key)):
            engine.prompt_tokens(req)
    off = GenerateRequest("r", "m", messages=HI, max_tokens=3, chat_template_kwargs={"enable_thinking": False})
    assert engine.prompt_tokens(off) == plain  # this template reads no switch: the same prompt
