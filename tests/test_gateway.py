"""The OpenAI-compatible gateway: the official openai clients against a real `lmx-gateway` process
on a loopback port, over a real supervisor with real workers; plus its pure parts in process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncGenerator, Iterator

import httpx
import openai
import pytest

from gateway import params, readiness
from gateway.app import GatewayConfig, create_app
from gateway.dialect import CHAT
from gateway.sse import GenerationResponse
from protocol import errors as E
from tests.harness import REPO, RunningSupervisor, wait_until

pytestmark = pytest.mark.timeout(60)

CHAOS_LOAD_CRASH = [sys.executable, "-m", "tests.chaos_worker", "--at", "load", "--signal", "SIGSEGV"]
HELLO = [{"role": "user", "content": "Hello"}]


class GatewayProcess:
    """`lmx-gateway --port 0`: the URL comes from its one stdout line; stopped with SIGTERM."""

    def __init__(self, root: Path, state_dir: Path, *extra: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.stderr_path = root / "gateway.stderr"
        entry = Path(sys.executable).parent / "lmx-gateway"
        cmd = [str(entry)] if entry.exists() else [sys.executable, "-m", "gateway.cli"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0", "--state-dir", str(state_dir), *extra], cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "ab"), text=True)
        line = self.proc.stdout.readline()  # printed once the socket listens, or EOF if it died
        assert line.startswith("lmx-gateway listening on "), f"{line!r}: {self.stderr_path.read_text()[-2000:]}"
        self.url = line.split()[-1]
        self.http = httpx.Client(base_url=self.url, timeout=30)
        wait_until(self._healthy, 15, "gateway /healthz")

    def _healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # uvicorn's own lines
            if isinstance(record, dict) and record.get("event") == name:
                out.append(record)
        return out

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def supervised_gateway(root: Path, models: list[dict], *gateway_args: str) -> Iterator[tuple[RunningSupervisor, "GatewayProcess"]]:
    """A module fixture's body: a supervisor with `models` under root/sup, one gateway in front
    (root/gw, with `gateway_args`); both stopped afterwards, the gateway's exit status checked."""
    sup = RunningSupervisor(root / "sup", models)
    try:
        sup.start()
        gateway = GatewayProcess(root / "gw", sup.state_dir, *gateway_args)
        yield sup, gateway
        assert gateway.stop() == 0
    finally:
        sup.cleanup()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway")
    sup = RunningSupervisor(root, [
        {"id": "tiny", "path": str(tiny_model)},
        {"id": "victim", "path": str(tiny_model)},  # SIGKILLed once
        {"id": "spare", "path": str(tiny_model), "autoload": False},  # loaded by the readiness test
        {"id": "broken", "path": str(tiny_model), "autoload": False, "worker_command": CHAOS_LOAD_CRASH},
    ], restart={"quarantine_after": 2, "backoff_initial_s": 0.05})
    try:
        sup.start(wait_ready=False)
        for model in ("tiny", "victim"):
            sup.wait_model(model, lambda m: m["state"] == "READY", 60, "READY")
        gateway = GatewayProcess(root / "gw", sup.state_dir)
        yield sup, gateway
        assert gateway.stop() == 0  # SIGTERM is a clean stop
    finally:
        sup.cleanup()


def _settled(sup: RunningSupervisor) -> None:
    """Every model READY or UNLOADED: nothing left over from an earlier test is still moving."""
    wait_until(lambda: all(m["state"] in ("READY", "UNLOADED") for m in sup.status()["models"]), 30, "settled")


# --- probes and listing ---------------------------------------------------------------------------


def test_healthz_and_models_list_only_routable_models_with_state_and_revision(gw) -> None:
    sup, gateway = gw
    _settled(sup)
    assert gateway.http.get("/healthz").json() == {"status": "ok"}
    revisions = {m["id"]: m["revision"] for m in sup.status()["models"]}
    listed = gateway.openai().models.list().data
    assert {m.id for m in listed} == {"tiny", "victim"}  # spare and broken are UNLOADED
    for m in listed:
        assert m.object == "model" and m.owned_by == "lmx-supervisor"
        assert m.state == "READY" and m.revision == revisions[m.id]


def test_readyz_is_200_only_once_a_loaded_model_is_routable(gw) -> None:
    sup, gateway = gw
    _settled(sup)
    ok = gateway.http.get("/readyz")
    assert ok.status_code == 200, ok.text
    assert set(ok.json()["required"]) == {"tiny", "victim"}
    assert sup.client.load("spare")["state"] == "ADMITTING"
    try:
        # Spawning a worker and importing mlx takes far longer than this round trip.
        starting = gateway.http.get("/readyz")
        assert starting.status_code == 503 and any("spare" in r for r in starting.json()["reasons"])
        with pytest.raises(openai.InternalServerError) as info:
            gateway.openai().chat.completions.create(model="spare", messages=HELLO, max_tokens=2)
        err = info.value
        assert err.status_code == 503 and err.code == "MODEL_NOT_READY"
        assert int(err.response.headers["retry-after"]) >= 1 and err.response.headers["x-should-retry"] == "true"
        wait_until(lambda: gateway.http.get("/readyz").status_code == 200, 30, "/readyz 200")
        assert sup.model("spare")["state"] == "READY"
    finally:
        sup.client.unload("spare")


# --- generations ----------------------------------------------------------------------------------


def test_chat_completion_matches_the_client_library_and_counts_usage(gw) -> None:
    sup, gateway = gw
    reply = gateway.openai().chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
    direct = sup.client.complete("tiny", messages=HELLO, max_tokens=5)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    assert choice.finish_reason == direct.finish_reason
    assert reply.usage.completion_tokens == direct.usage["completion_tokens"]
    assert reply.usage.prompt_tokens == direct.usage["prompt_tokens"] > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_and_max_completion_tokens(gw) -> None:
    sup, gateway = gw
    client = gateway.openai()
    reply = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, seed=3)
    direct = sup.client.complete("tiny", "The quick brown fox", max_tokens=7)
    assert reply.object == "text_completion" and reply.choices[0].text == direct.text
    assert reply.usage.completion_tokens == direct.usage["completion_tokens"]
    chat = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=3,
                                          temperature=0.7, top_p=0.9, seed=1)
    assert chat.usage.completion_tokens <= 3


def test_streamed_chunks_concatenate_to_the_full_answer(gw) -> None:
    _, gateway = gw
    client = gateway.openai()
    full = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=10)
    streamed = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stop_as_a_string_or_a_list_ends_the_text_before_it(gw) -> None:
    _, gateway = gw
    client = gateway.openai()
    full = client.completions.create(model="tiny", prompt="Numbers such as", max_tokens=40).choices[0].text
    assert len(full) > 12, full
    stop = full[8:11]
    cut = client.completions.create(model="tiny", prompt="Numbers such as", max_tokens=40, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    streamed = list(client.completions.create(model="tiny", prompt="Numbers such as", max_tokens=40,
                                              stop=["\x00never", stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_streams_each_get_their_own_text(gw) -> None:
    sup, gateway = gw
    prompts = ["Hello", "The quick brown fox", "What is the capital", "Numbers such as"]

    async def stream_all() -> list[str]:
        client = gateway.async_openai()

        async def one(prompt: str) -> str:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=16, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    texts = asyncio.run(stream_all())
    for prompt, text in zip(prompts, texts):
        assert text == sup.client.complete("tiny", messages=[{"role": "user", "content": prompt}], max_tokens=16).text


def _request_end(sup: RunningSupervisor, rid: str) -> dict:
    def ended() -> dict | None:
        return next((e for e in sup.events() if e.get("event") in ("request.done", "request.failed")
                     and e.get("request_id") == rid), None)

    return wait_until(ended, 10, f"request {rid} to end in the supervisor log")


def test_a_client_that_disconnects_mid_stream_cancels_its_request(gw) -> None:
    sup, gateway = gw
    client = gateway.openai()
    # Several times: a disconnect that lands just as a chunk arrives used to be lost (the
    # client's wait_for swallowed the cancellation, see gateway/sse.py).
    for _ in range(5):
        stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1500, stream=True)
        rid = next(iter(stream)).id.removeprefix("chatcmpl-")
        stream.close()  # drops the connection, as a browser tab closing would
        assert _request_end(sup, rid)["code"] == "CANCELLED"
        wait_until(lambda: sup.model("tiny")["active"] == 0, 10, "the worker free again")
        wait_until(lambda: rid in {e["request_id"] for e in gateway.events("gateway.client_disconnected")},
                   5, "the gateway's log line")


def test_a_client_that_disconnects_before_a_plain_answer_cancels_it_too(gw) -> None:
    sup, gateway = gw
    _settled(sup)
    before = {e["request_id"] for e in gateway.events("gateway.client_disconnected")}

    async def give_up_while_generating() -> None:
        client = gateway.async_openai()
        try:
            call = asyncio.ensure_future(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1500))
            await asyncio.to_thread(sup.wait_model, "tiny", lambda m: m["active"] == 1, 10, "generating")
            call.cancel()  # the connection goes with it
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            await client.close()

    asyncio.run(give_up_while_generating())
    new = wait_until(lambda: {e["request_id"] for e in gateway.events("gateway.client_disconnected")} - before,
                     10, "the gateway's log line")
    (rid,) = new
    assert _request_end(sup, rid)["code"] == "CANCELLED"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_unknown_model_is_404_with_its_code(gw, stream: bool) -> None:
    _, gateway = gw
    with pytest.raises(openai.NotFoundError) as info:
        gateway.openai().chat.completions.create(model="nope", messages=HELLO, max_tokens=2, stream=stream)
    err = info.value
    assert err.status_code == 404 and err.code == "UNKNOWN_MODEL" and err.type == "invalid_request_error"
    assert err.body["param"] is None and err.body["retryable"] is False
    assert err.response.headers["x-should-retry"] == "false"


def test_bad_requests_are_400_in_openai_shape(gw) -> None:
    _, gateway = gw
    raw = gateway.http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400
    assert raw.json()["error"]["code"] == "BAD_REQUEST" and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        gateway.openai().chat.completions.create(model="tiny", messages=HELLO, max_tokens=0)
    assert info.value.code == "BAD_REQUEST" and info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        gateway.openai().completions.create(model="tiny", prompt="x", stop=[""])
    assert info.value.param == "stop"


def test_a_quarantined_model_is_503_with_its_code_and_readyz_says_so(gw) -> None:
    sup, gateway = gw
    _settled(sup)
    sup.client.load("broken")
    try:
        sup.wait_model("broken", lambda m: m["state"] == "QUARANTINED", 40, "QUARANTINED")
        with pytest.raises(openai.InternalServerError) as info:
            gateway.openai().chat.completions.create(model="broken", messages=HELLO, max_tokens=2, stream=True)
        err = info.value
        assert err.status_code == 503 and err.code == "MODEL_QUARANTINED"
        assert err.body["retryable"] is False and err.body["details"]["failures"] == 2
        assert err.response.headers["x-should-retry"] == "false"  # the SDK's retries would be for nothing
        ready = gateway.http.get("/readyz")
        assert ready.status_code == 503
        assert any("broken" in r and "QUARANTINED" in r for r in ready.json()["reasons"])
        assert "broken" not in {m.id for m in gateway.openai().models.list().data}
    finally:
        sup.client.unload("broken")
    assert gateway.http.get("/readyz").status_code == 200


def test_a_worker_sigkilled_mid_stream_ends_the_stream_with_worker_crashed(gw) -> None:
    sup, gateway = gw
    _settled(sup)
    pid = sup.model("victim")["worker_pid"]
    stream = gateway.openai().chat.completions.create(model="victim", messages=HELLO, max_tokens=1500, stream=True)
    seen = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            seen += 1
            if seen == 2:
                os.kill(pid, signal.SIGKILL)
    err = info.value
    # An error event after the 200: the SDK raises a plain APIError carrying the event's object.
    assert not isinstance(err, openai.APIStatusError)
    assert err.code == "WORKER_CRASHED" and err.type == "server_error"
    assert err.body["retryable"] is True and err.body["details"]["signal"] == "SIGKILL"
    sup.wait_model("victim", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "restarted")


# --- in process: the response's semantics, no supervisor ---------------------------------------------


def _asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def test_an_error_after_the_stream_started_is_a_last_event_and_no_done() -> None:
    async def events() -> AsyncGenerator[dict, None]:
        yield {"n": 1}
        yield {"n": 2}
        raise E.WorkerCrashed("worker pid 1 died (SIGKILL)", signal="SIGKILL")

    async def early() -> AsyncGenerator[dict, None]:
        raise E.ModelNotReady("loading", retry_after_s=2.5)
        yield {}

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            gen = events() if scope["path"] == "/late" else early()
            await GenerationResponse(gen, streaming=True, request_id="r1", dialect=CHAT)(scope, receive, send)

        async with _asgi_client(app) as client:
            return await client.get("/late"), await client.get("/early")

    late, early_resp = asyncio.run(run())
    assert late.status_code == 200 and late.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in late.text.split("\n\n") if f]
    assert [json.loads(f.removeprefix("data: ")) for f in frames[:2]] == [{"n": 1}, {"n": 2}]
    last = json.loads(frames[-1].removeprefix("data: "))["error"]
    assert last["code"] == "WORKER_CRASHED" and last["details"]["signal"] == "SIGKILL"
    assert "[DONE]" not in late.text and len(frames) == 3
    assert early_resp.status_code == 503 and early_resp.json()["error"]["code"] == "MODEL_NOT_READY"
    assert early_resp.headers["retry-after"] == "3" and early_resp.headers["retry-after-ms"] == "2500"


def test_without_a_supervisor_the_gateway_is_alive_but_not_ready(tmp_path: Path) -> None:
    async def run() -> dict[str, httpx.Response]:
        app = create_app(GatewayConfig(state_dir=str(tmp_path / "nobody-here")))
        async with _asgi_client(app) as client:
            return {
                "healthz": await client.get("/healthz"),
                "readyz": await client.get("/readyz"),
                "models": await client.get("/v1/models"),
                "chat": await client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO}),
            }

    got = asyncio.run(run())
    assert got["healthz"].status_code == 200
    for name in ("readyz", "models", "chat"):
        assert got[name].status_code == 503, name
        assert got[name].json()["error"]["code"] == "SUPERVISOR_UNAVAILABLE"


def _status(*models: dict, **sup: Any) -> dict:
    return {"supervisor": {"draining": False, "safe_mode": False, **sup}, "models": list(models)}


@pytest.mark.parametrize("status, required, ready", [
    (_status({"id": "a", "state": "READY"}, {"id": "b", "state": "UNLOADED"}), (), True),
    (_status({"id": "a", "state": "READY"}, {"id": "b", "state": "CANARY"}), (), False),  # loaded, not routable
    (_status({"id": "a", "state": "READY"}, {"id": "b", "state": "QUARANTINED"}), (), False),
    (_status({"id": "a", "state": "READY"}, {"id": "b", "state": "QUARANTINED"}), ("a",), True),
    (_status({"id": "a", "state": "READY"}), ("zz",), False),
    (_status({"id": "a", "state": "UNLOADED"}, safe_mode=True), (), False),
    (_status({"id": "a", "state": "READY"}, draining=True), (), False),
    # Once status carries the flags, they decide.
    (_status({"id": "a", "state": "UNLOADED", "autoload": True, "wanted": None}), (), False),
    (_status({"id": "a", "state": "LOADING", "autoload": True, "wanted": False}), (), True),
], ids=["unloaded-not-wanted", "canary", "quarantined", "required-only", "undeclared", "safe-mode", "draining",
        "autoload-flag", "wanted-flag"])
def test_readiness_rules(status: dict, required: tuple, ready: bool) -> None:
    assert readiness.check(status, required)[0] is ready


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"messages": HELLO}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": HELLO, "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": HELLO, "stop": [1]}, "stop"),
    ({"model": "m", "messages": HELLO, "n": 2}, "n"),
    ({"model": "m", "messages": HELLO, "stream": "yes"}, "stream"),
])
def test_chat_params_are_validated(body: Any, param: str | None) -> None:
    with pytest.raises(E.BadRequest) as info:
        params.chat(body)
    assert info.value.details.get("param") == param


def test_params_map_openai_fields_to_the_client() -> None:
    p = params.chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}],
                     "max_tokens": 9, "max_completion_tokens": 4, "stop": "x", "seed": 7, "temperature": 1,
                     "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"})
    assert p.client_kwargs() == {"prompt": None, "messages": [{"role": "user", "content": "ab"}], "max_tokens": 4,
                                 "temperature": 1.0, "top_p": 1.0, "seed": 7, "stop": ["x"]}
    assert p.stream and p.include_usage
    c = params.completion({"model": "m", "prompt": ["only one"]})
    assert c.prompt == "only one" and c.max_tokens == params.COMPLETIONS_DEFAULT_MAX_TOKENS


# --- SmolLM2 ----------------------------------------------------------------------------------------

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path):
    root = tmp_path_factory.mktemp("gateway-smol")
    sup = RunningSupervisor(root, [{"id": "smollm2", "path": str(smollm2_model),
                                    "canary": {"prompt": "Say hello.", "max_tokens": 2, "timeout_s": 60.0}}])
    try:
        sup.start(timeout_s=90)
        gateway = GatewayProcess(root / "gw", sup.state_dir)
        yield gateway
        assert gateway.stop() == 0
    finally:
        sup.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smollm2_answers_paris_through_the_openai_client(smol: GatewayProcess) -> None:
    reply = smol.openai().chat.completions.create(model="smollm2", messages=PARIS, max_tokens=8)
    assert "Paris" in reply.choices[0].message.content
    assert 1 <= reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 10


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smollm2_streams_and_stops_before_the_stop_string(smol: GatewayProcess) -> None:
    async def run() -> list:
        client = smol.async_openai()
        try:
            stream = await client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=8,
                                                          stop="Paris", stream=True)
            return [c async for c in stream]
        finally:
            await client.close()

    chunks = asyncio.run(run())
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "France" in text and "Paris" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"
