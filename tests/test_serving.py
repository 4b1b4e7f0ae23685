"""End to end: a real supervisor, real workers running mlx-lm on a tiny llama, real ZeroMQ."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    s = RunningSupervisor(
        tmp_path_factory.mktemp("serving"),
        [{"id": "tiny-a", "path": str(tiny_model)},
         {"id": "tiny-b", "path": str(tiny_model), "canary": {"prompt": "Hello", "max_tokens": 4}}],
    ).start()
    yield s
    s.cleanup()


def _encode_len(model: Path, text: str) -> int:
    return len(Tokenizer.from_file(str(model / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def test_status_shows_every_model_and_no_mlx_in_the_supervisor(sup: RunningSupervisor) -> None:
    status = sup.status()
    assert status["supervisor"]["pid"] == sup.proc.pid
    assert status["supervisor"]["mlx_imported"] is False
    # Not just its own word: no mlx library is mapped into the supervisor process.
    maps = Path(f"/proc/{sup.proc.pid}/maps")
    if maps.exists():
        assert "libmlx" not in maps.read_text()
    models = {m["id"]: m for m in status["models"]}
    assert set(models) == {"tiny-a", "tiny-b"}
    for m in models.values():
        assert m["state"] == "READY"
        assert len(m["revision"]) == 12
        assert m["worker_pid"] and m["last_error"] is None
    assert models["tiny-a"]["worker_pid"] != models["tiny-b"]["worker_pid"]
    assert models["tiny-a"]["revision"] != models["tiny-b"]["revision"]


def test_streamed_chunks_concatenate_to_the_final_text_and_usage_counts(
    sup: RunningSupervisor, tiny_model: Path
) -> None:
    prompt = "The quick brown fox"
    gen = sup.client.generate("tiny-a", prompt, max_tokens=24)
    chunks = []
    try:
        while True:
            chunks.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert "".join(c.text for c in chunks) == result.text
    assert sum(c.tokens for c in chunks) == result.usage["completion_tokens"]
    assert 1 <= result.usage["completion_tokens"] <= 24
    assert result.finish_reason in ("length", "stop")
    if result.finish_reason == "length":
        assert result.usage["completion_tokens"] == 24
    assert result.usage["prompt_tokens"] == _encode_len(tiny_model, prompt)
    assert result.timings["total_s"] > 0


def test_greedy_generation_is_deterministic(sup: RunningSupervisor) -> None:
    a = sup.client.complete("tiny-a", "Hello, world!", max_tokens=16)
    b = sup.client.complete("tiny-a", "Hello, world!", max_tokens=16)
    assert a.text == b.text
    assert (a.usage["prompt_tokens"], a.usage["completion_tokens"]) == (b.usage["prompt_tokens"], b.usage["completion_tokens"])
    assert b.usage["cached_tokens"] == b.usage["prompt_tokens"] - 1  # the second one hit the first's KV


def test_chat_messages_go_through_the_chat_template(sup: RunningSupervisor, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = sup.client.complete("tiny-b", messages=messages, max_tokens=8)
    template = json.loads((tiny_model / "tokenizer_config.json").read_text())["chat_template"]
    rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
    assert result.usage["prompt_tokens"] == _encode_len(tiny_model, rendered)
    assert result.usage["completion_tokens"] >= 1


def test_stop_strings_end_the_text_before_the_stop(sup: RunningSupervisor) -> None:
    full = sup.client.complete("tiny-a", "Numbers such as", max_tokens=40)
    assert len(full.text) > 12, full.text
    stop = full.text[8:11]
    cut = sup.client.complete("tiny-a", "Numbers such as", max_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]


def test_two_models_stream_at_the_same_time(sup: RunningSupervisor) -> None:
    async def both() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return await asyncio.gather(
                client.complete("tiny-a", "Hello", max_tokens=32),
                client.complete("tiny-b", "Hello", max_tokens=32),
                client.status(),
            )

    a, b, status = asyncio.run(both())
    assert a.usage["completion_tokens"] >= 1 and b.usage["completion_tokens"] >= 1
    assert status["supervisor"]["pid"] == sup.proc.pid


def test_cancel_mid_stream_frees_the_model(sup: RunningSupervisor) -> None:
    async def cancel_then_generate() -> tuple[int, object]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate("tiny-a", "Hello", max_tokens=1500)
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
            await stream.aclose()
            after = await client.complete("tiny-a", "Hello", max_tokens=4)
            return seen, after

    seen, after = asyncio.run(cancel_then_generate())
    assert seen == 3 and after.usage["completion_tokens"] >= 1
    codes = [e.get("code") for e in sup.events("request.failed") if e["model"] == "tiny-a"]
    assert "CANCELLED" in codes


@pytest.mark.parametrize(
    "model, kwargs, error",
    [
        ("nope", {"prompt": "x"}, E.UnknownModel),
        ("tiny-a", {}, E.BadRequest),
        ("tiny-a", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, E.BadRequest),
        ("tiny-a", {"prompt": "x", "max_tokens": 0}, E.BadRequest),
    ],
)
def test_bad_requests_get_typed_errors_at_once(sup: RunningSupervisor, model: str, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        sup.client.complete(model, **kwargs)


def test_request_deadline_is_a_typed_timeout(sup: RunningSupervisor) -> None:
    with pytest.raises(E.RequestTimeout):
        sup.client.complete("tiny-a", "Hello", max_tokens=1500, timeout_s=0.3)
    assert sup.client.complete("tiny-a", "Hello", max_tokens=2).usage["completion_tokens"] >= 1
