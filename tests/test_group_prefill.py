"""A group's prompt is prefilled in chunks that rank 0 sizes and every rank runs together
(worker.group): a cancel or a deadline ends a long prompt on every rank at the same chunk boundary,
with the code one host gives, and the group serves the next request in lockstep. A render is rank
0's alone: its refusal is every rank's, and a follower whose own render would fail serves anyway.

Two ranks on 127.0.0.1 and one worker beside them, all on the tiny llama with room for long prompts
(max_position_embeddings 8192) and mlx-lm's 2048-token prefill step; on the CPU backend a
5,000-token prompt takes seconds to prefill, in chunks of about half a second."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(180)

GROUP = {"hosts": ["local", "local"]}
PROMPT = "Hello world, the capital of France"
HI = [{"role": "user", "content": "Hello"}]
STALL_S = 5.0  # the supervisor's prefill_stall_s here
SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 17 tokens
# Quadratic in the messages (each looks at every other), in the model's own template: nothing for a
# chat, 10-40 s for 120 one-word messages (whose prompt is short: the cost is the template's), so far
# past the 1 s bound below on any machine (at a tenth of it, a fast one rendered it within the bound).
SLOW_LOOP = ("{% for m in messages %}{% for n in messages %}{% for k in range(20000) %}"
             "{% endfor %}{% endfor %}{% endfor %}")
SLOW = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(120)]
# The worker as it runs in production, with a render bound a test can wait for, and a rank 1 whose
# every render fails: as a slower host's bound would fire where rank 0's did not.
RANK_BOUNDS = [sys.executable, "-c", "\n".join([
    "import os, worker.render as r",
    "r.RENDER_TIMEOUT_S = 1.0",
    "def refuse(*a, **k):",
    "    raise r.RenderStopped('rank 1 renders nothing')",
    "if os.environ.get('MLX_RANK') == '1':",
    "    r.bounded = refuse",
    "from worker.main import main",
    "raise SystemExit(main())"])]


def _long(tag: str, sentences: int = 300) -> str:
    return f"{tag}. " + SENTENCE * sentences  # ~5,100 tokens


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("groupprefill")
    # float32, larger weights: greedy text that does not flip between one worker and two ranks.
    path = write_tiny_llama(root / "long", dtype="float32", scale=0.2, shape={"max_position_embeddings": 8192})
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = SLOW_LOOP + cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    common = {"path": str(path), "context_tokens": 8192, "prefill_step_size": 2048, "prefix_cache_bytes": 0,
              "worker_command": RANK_BOUNDS}
    # A prefill stall budget of a few chunks: every rank's progress must move per chunk, not per prompt.
    s = RunningSupervisor(root / "sup", [{"id": "big", "group": GROUP, **common},
                                         {"id": "one", "max_batch_size": 1, **common}],
                          supervisor={"prefill_stall_s": STALL_S})
    try:
        yield s.start()
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def full_s(sup: RunningSupervisor) -> float:
    """How long the group takes to prefill a long prompt whole."""
    start = time.monotonic()
    sup.client.complete("big", _long("measured"), max_tokens=1)
    took = time.monotonic() - start
    print(f"the group prefills a ~5,100-token prompt in {took:.2f}s")
    return took


def _ranks(sup: RunningSupervisor) -> tuple:
    m = sup.model("big")
    return tuple(r["pid"] for r in m["group"]), m["restarts"]


def _in_lockstep(sup: RunningSupervisor, before: tuple) -> None:
    """The same ranks, never restarted, answering as one worker does."""
    grouped, alone = (sup.client.complete(m, PROMPT, max_tokens=12).text for m in ("big", "one"))
    assert grouped == alone
    assert _ranks(sup) == before
    assert not [e for e in sup.events("group.failed") if e.get("model") == "big"]


def _idle(sup: RunningSupervisor, model: str) -> None:
    wait_until(lambda: sup.model(model)["phase"] == "idle", 10, f"{model} idle")


def test_a_cancel_mid_prefill_ends_the_prompt_on_every_rank_within_a_chunk(sup: RunningSupervisor,
                                                                          full_s: float) -> None:
    before = _ranks(sup)

    async def run() -> float:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            await asyncio.to_thread(_idle, sup, "big")
            gone = client.generate("big", _long("abandoned"), max_tokens=64)
            await gone._open()  # sent; its client reads nothing and leaves once prefill is under way
            await asyncio.to_thread(wait_until, lambda: sup.model("big")["phase"] == "prefill", 10,
                                    "the abandoned prompt prefilling")
            await gone.aclose()
            start = time.monotonic()
            short = await client.complete("big", "Hi", max_tokens=1)
            assert short.usage["completion_tokens"] == 1
            return time.monotonic() - start

    behind_s = asyncio.run(run())
    print(f"full group prefill {full_s:.2f}s; a 1-word request behind the cancelled prompt {behind_s:.2f}s")
    assert behind_s < full_s / 4, (full_s, behind_s)
    _in_lockstep(sup, before)


def test_a_deadline_mid_prefill_is_request_timeout_as_on_one_host(sup: RunningSupervisor, full_s: float) -> None:
    if full_s < 2.0:
        pytest.skip(f"this backend prefills the prompt in {full_s:.1f}s: no room for a deadline inside it")
    before = _ranks(sup)

    async def run(model: str) -> tuple[str, float]:
        async with SupervisorClient(state_dir=sup.state_dir, timeout_s=120) as client:
            await asyncio.to_thread(_idle, sup, model)
            stream = client.generate(model, _long(f"late for {model}"), max_tokens=8, timeout_s=1.0)
            with pytest.raises(E.RequestTimeout):
                await stream.collect()
            start = time.monotonic()
            assert (await client.complete(model, "Hi", max_tokens=1)).usage["completion_tokens"] == 1
            return stream.request_id, time.monotonic() - start

    ends = {model: asyncio.run(run(model)) for model in ("one", "big")}
    print("a 1-word request behind a prompt past its deadline: "
          + ", ".join(f"{m} {behind:.2f}s" for m, (_, behind) in ends.items()))
    assert ends["big"][1] < full_s / 4, ends

    def codes() -> dict | None:
        found = {e["model"]: e.get("code") for e in sup.events("request.failed")
                 if e.get("request_id") in {rid for rid, _ in ends.values()}}
        return found if len(found) == 2 else None

    assert wait_until(codes, 10, "both requests' ends in the log") == {"one": "REQUEST_TIMEOUT",
                                                                       "big": "REQUEST_TIMEOUT"}
    _in_lockstep(sup, before)


def test_a_render_is_rank_0s_alone_and_its_refusal_every_ranks(sup: RunningSupervisor) -> None:
    before = _ranks(sup)
    # Rank 1 renders nothing, and serves the chat all the same: its prompt is the one rank 0 rendered.
    assert sup.client.complete("big", messages=HI, max_tokens=8).text == \
        sup.client.complete("one", messages=HI, max_tokens=8).text
    # Rank 0's bound stops a slow render: refused as one host refuses it, and no rank runs it.
    for model in ("one", "big"):
        with pytest.raises(E.BadRequest, match="to render"):
            sup.client.complete(model, messages=SLOW, max_tokens=4)
    _in_lockstep(sup, before)
