"""API keys for a real `lmx-gateway` over a real supervisor: created and revoked with the real
`lmxctl keys api` while the gateway runs, presented the way the official SDKs present them
(openai: Authorization: Bearer; anthropic: x-api-key), scoped to models and endpoints, limited per
key (requests and tokens per minute, requests at once) with 429 + Retry-After in each dialect's
shape, and required whenever the gateway listens beyond loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.harness import RunningSupervisor, wait_until
from tests.test_gateway import GatewayProcess

pytestmark = pytest.mark.timeout(90)

ASK = [{"role": "user", "content": "Hi"}]


def lmxctl(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=30)


def new_key(state_dir: Path, name: str, *flags: str) -> str:
    done = lmxctl(state_dir, "keys", "api", "new", name, *flags, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["key"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-keys")
    sup = RunningSupervisor(root / "sup", [{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}])
    try:
        sup.start()
        gateway = GatewayProcess(root / "gw", sup.state_dir)  # loopback, no key yet: open
        yield sup, gateway
        assert gateway.stop() == 0
    finally:
        sup.cleanup()


def _oa(gw: GatewayProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def _an(gw: GatewayProcess, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30)


def test_keys_are_off_on_loopback_until_one_exists_then_required(gw) -> None:
    sup, gateway = gw
    assert _oa(gateway).chat.completions.create(model="a", messages=ASK, max_tokens=2).choices
    key = new_key(sup.state_dir, "first")
    assert key not in (sup.state_dir / "gateway" / "api_keys.json").read_text(), "only the digest is stored"

    def refused() -> bool:
        try:
            _oa(gateway).models.list()
        except openai.AuthenticationError:
            return True
        return False

    wait_until(refused, 5, "the gateway to require a key once one exists")
    assert _oa(gateway, key).chat.completions.create(model="a", messages=ASK, max_tokens=2).choices
    msg = _an(gateway, key).messages.create(model="a", max_tokens=2, messages=ASK)  # x-api-key
    assert msg.content
    with pytest.raises(anthropic.AuthenticationError) as info:
        _an(gateway, key[:-1] + ("A" if key[-1] != "A" else "B")).messages.create(model="a", max_tokens=2, messages=ASK)
    assert info.value.body["error"]["details"]["error_code"] == "UNAUTHORIZED"
    assert gateway.http.get("/healthz").status_code == 200 and gateway.http.get("/readyz").status_code == 200

    new_key(sup.state_dir, "second")  # with no key left, a loopback gateway is open again
    assert lmxctl(sup.state_dir, "keys", "api", "revoke", "first").returncode == 0

    def revoked() -> bool:
        try:
            _oa(gateway, key).models.list()
        except openai.AuthenticationError:
            return True
        return False

    wait_until(revoked, 5, "a revoked key to be refused")


def test_a_key_sees_only_its_models(gw) -> None:
    sup, gateway = gw
    key = new_key(sup.state_dir, "only-a", "--model", "a")
    client = _oa(gateway, key)
    wait_until(lambda: _ok(lambda: client.models.list()), 5, "the new key to be taken")
    assert [m.id for m in client.models.list()] == ["a"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="b", messages=ASK, max_tokens=2)
    with pytest.raises(anthropic.NotFoundError):
        _an(gateway, key).messages.count_tokens(model="b", messages=ASK)
    assert client.chat.completions.create(model="a", messages=ASK, max_tokens=2).choices


def _ok(call) -> bool:  # type: ignore[no-untyped-def]
    try:
        call()
    except (openai.AuthenticationError, openai.RateLimitError):
        return False
    return True


def test_requests_per_minute_is_429_with_retry_after_in_each_dialect(gw) -> None:
    sup, gateway = gw
    key = new_key(sup.state_dir, "slow", "--rpm", "2")
    client = _oa(gateway, key)
    wait_until(lambda: _ok(lambda: client.chat.completions.create(model="a", messages=ASK, max_tokens=1)), 5,
               "the new key")
    client.chat.completions.create(model="a", messages=ASK, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="a", messages=ASK, max_tokens=1)
    assert int(info.value.response.headers["retry-after"]) >= 1 and info.value.code == "OVERLOADED"
    with pytest.raises(anthropic.RateLimitError) as ai:
        _an(gateway, key).messages.create(model="a", max_tokens=1, messages=ASK)
    assert ai.value.body["error"]["details"]["limit"] == "requests_per_minute"


def test_tokens_per_minute_and_concurrency(gw) -> None:
    sup, gateway = gw
    key = new_key(sup.state_dir, "tokens", "--tpm", "5")
    client = _oa(gateway, key)
    wait_until(lambda: _ok(lambda: client.chat.completions.create(model="a", messages=ASK, max_tokens=8)), 5,
               "the new key")  # a prompt and 8 tokens: far past 5 a minute

    def limited() -> openai.RateLimitError | None:
        # Tokens are charged as the response ends, which may be just after its client has it all.
        try:
            client.chat.completions.create(model="a", messages=ASK, max_tokens=1)
        except openai.RateLimitError as exc:
            return exc
        return None

    assert "tokens per minute" in wait_until(limited, 5, "the key over its tokens per minute").message

    one = new_key(sup.state_dir, "one-at-a-time", "--concurrency", "1")
    wait_until(lambda: _ok(lambda: _oa(gateway, one).models.list()), 5, "the new key")
    headers = {"authorization": f"Bearer {one}"}
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as held:
        # A request whose body is still coming is in flight from its headers on.
        held.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {one}\r\n"
                     f"content-length: 200\r\n\r\n{{".encode())

        def second() -> httpx.Response | None:
            r = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=30,
                           json={"model": "a", "messages": ASK, "max_tokens": 1})
            return r if r.status_code == 429 else None

        r = wait_until(second, 5, "the second request at once refused")
        assert r.json()["error"]["details"]["limit"] == "concurrency"
    assert wait_until(lambda: _ok(lambda: _oa(gateway, one).chat.completions.create(
        model="a", messages=ASK, max_tokens=1)), 5, "the slot back once the held request is gone")


def test_metrics_need_the_admin_scope_and_count_per_key(gw) -> None:
    sup, gateway = gw
    admin = new_key(sup.state_dir, "ops", "--scope", "inference", "--scope", "admin")
    user = new_key(sup.state_dir, "user")
    wait_until(lambda: gateway.http.get("/metrics", headers={"x-api-key": admin}).status_code == 200, 5, "admin key")
    assert gateway.http.get("/metrics", headers={"x-api-key": user}).status_code == 401
    _oa(gateway, user).chat.completions.create(model="a", messages=ASK, max_tokens=2)
    text = gateway.http.get("/metrics", headers={"authorization": f"Bearer {admin}"}).text
    assert 'lmx_gateway_requests_total{key="user"}' in text
    assert 'lmx_gateway_tokens_total{key="user",kind="completion"}' in text
    assert 'lmx_gateway_refused_total{key="",reason="unauthenticated"}' in text


def test_beyond_loopback_the_gateway_needs_keys_or_no_auth(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "gateway.cli", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(state)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "without API keys" in done.stderr
    key = new_key(state, "lan")
    gateway = GatewayProcess(tmp_path / "gw", state, "--host", "0.0.0.0")
    try:
        assert gateway.http.get("/v1/models").status_code == 401
        lmxctl(state, "keys", "api", "revoke", "lan")
        # Every key revoked: still required (a LAN bind never falls open).
        wait_until(lambda: gateway.http.get("/v1/models", headers={"x-api-key": key}).status_code == 401, 5,
                   "the revoked key refused")
        assert gateway.http.get("/v1/models").status_code == 401
    finally:
        assert gateway.stop() == 0
