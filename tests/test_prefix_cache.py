"""The worker's prefix KV cache, end to end: a real supervisor, real workers and mlx-lm on a float32
tiny llama. A cache hit must change nothing a client can see but the time to first token and
`cached_tokens`: greedy output is compared token for token with a model of the same snapshot whose
cache is off."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from tests.harness import REPO, RunningSupervisor, wait_until
from tests.snapshots import write_tiny_llama

BASE = ("A long shared system prompt that every turn of the conversation starts with, so that the "
        "second request finds the first one's KV state. ") * 24  # ~700 tokens
SUFFIXES = ["Tell me about Paris.", "What is a fox?", "Hello, world!", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # float32 and a larger weight scale: outputs follow the whole context and never flip on rounding.
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny32", dtype="float32", scale=0.3)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, model32: Path, tiny_model: Path):
    s = RunningSupervisor(
        tmp_path_factory.mktemp("prefix"),
        [{"id": "cached", "path": str(model32)},
         {"id": "plain", "path": str(model32), "prefix_cache_bytes": 0},
         {"id": "one", "path": str(model32), "max_batch_size": 1},
         {"id": "rep", "path": str(tiny_model)}],
    ).start()
    yield s
    s.cleanup()


def _greedy(sup: RunningSupervisor, model: str, prompt: str, max_tokens: int = 16):
    return sup.client.complete(model, prompt, max_tokens=max_tokens)


def _concurrently(sup: RunningSupervisor, model: str, prompts: list[str], max_tokens: int = 12) -> list:
    async def run() -> list:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return await asyncio.gather(*(client.complete(model, p, max_tokens=max_tokens) for p in prompts))

    return asyncio.run(run())


def test_a_hit_gives_the_output_of_a_full_prefill_at_several_prefix_lengths(sup: RunningSupervisor) -> None:
    first = _greedy(sup, "cached", BASE + SUFFIXES[0])
    assert first.text == _greedy(sup, "plain", BASE + SUFFIXES[0]).text
    for cut in (len(BASE) // 3, 2 * len(BASE) // 3, len(BASE)):
        prompt = BASE[:cut] + SUFFIXES[1]
        hit, ref = _greedy(sup, "cached", prompt), _greedy(sup, "plain", prompt)
        assert hit.text == ref.text, f"a hit at {cut} chars changed the output"
        assert hit.usage["prompt_tokens"] == ref.usage["prompt_tokens"]
        assert hit.usage["cached_tokens"] >= hit.usage["prompt_tokens"] * cut / len(prompt) * 0.8
        assert ref.usage["cached_tokens"] == 0
    # The whole prompt again, and a prompt that extends a finished answer: both hits.
    again = _greedy(sup, "cached", BASE + SUFFIXES[0])
    assert again.text == first.text and again.usage["cached_tokens"] == again.usage["prompt_tokens"] - 1
    longer = BASE + SUFFIXES[0] + first.text + " And then?"
    hit, ref = _greedy(sup, "cached", longer), _greedy(sup, "plain", longer)
    assert hit.text == ref.text and hit.usage["cached_tokens"] > again.usage["prompt_tokens"] - 4


def test_hits_in_the_batch_give_the_output_of_a_full_prefill(sup: RunningSupervisor) -> None:
    _greedy(sup, "cached", BASE + "warm")  # the shared prefix is in the cache
    prompts = [BASE + s for s in SUFFIXES]
    hits, refs = _concurrently(sup, "cached", prompts), _concurrently(sup, "plain", prompts)
    assert [h.text for h in hits] == [r.text for r in refs]
    assert all(h.usage["cached_tokens"] > len(BASE) // 8 for h in hits)  # ~4 chars a token here


def test_one_at_a_time_serving_goes_through_the_same_path(sup: RunningSupervisor) -> None:
    prompts = [BASE + s for s in SUFFIXES[:3]]
    ones, refs = _concurrently(sup, "one", prompts), _concurrently(sup, "plain", prompts)
    assert [o.text for o in ones] == [r.text for r in refs]
    assert sum(o.usage["cached_tokens"] > 100 for o in ones) >= 2  # the first fills, the others hit
    # The first found nothing, though "cached" on the same snapshot holds this prefix: models never
    # share entries.
    assert min(o.usage["cached_tokens"] for o in ones) < 16
    stopped = sup.client.complete("one", BASE + SUFFIXES[0], max_tokens=16, stop=[ones[0].text[3:6]])
    assert stopped.finish_reason == "stop" and stopped.text == ones[0].text[:3]


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_unfinished_request_leaves_no_entry(sup: RunningSupervisor, how: str) -> None:
    # "rep" (the default tiny llama) repeats one token forever: its requests end only by a cancel
    # or a deadline.
    prompt = f"Zebra {how}: " + "an unrelated prompt that shares nothing with the others. " * 12

    async def run() -> None:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            if how == "deadline":
                with pytest.raises(E.RequestTimeout):
                    await client.complete("rep", prompt, max_tokens=100_000, timeout_s=0.5)
                return
            stream = client.generate("rep", prompt, max_tokens=100_000)
            async for _ in stream:
                break
            await stream.aclose()

    asyncio.run(run())
    sup.wait_model("rep", lambda m: m["active"] == 0, 30, "the unfinished request gone")
    # The same prompt again finds nothing of it (status's figures lag a heartbeat; usage does not).
    again = _greedy(sup, "rep", prompt, max_tokens=4)
    assert again.usage["cached_tokens"] < 16  # at most the template's opening, never the prompt


def test_status_and_metrics_account_for_the_cache(sup: RunningSupervisor) -> None:
    # The worker's figures arrive with its heartbeats: wait for one that has seen the hits above.
    pc = sup.wait_model("cached", lambda m: m["prefix_cache"].get("hit_tokens", 0) > 0, 10, "a hit in the heartbeat")["prefix_cache"]
    assert 0 < pc["bytes"] <= pc["budget_bytes"] and pc["entries"] >= 1
    assert pc["hit_tokens"] > 0 and pc["miss_tokens"] > 0 and pc["hit_tokens_total"] >= pc["hit_tokens"]
    assert sup.model("plain")["prefix_cache"].get("bytes", 0) == 0
    text = sup.client.metrics()
    for name in ("lmx_prefix_cache_hit_tokens_total", "lmx_prefix_cache_miss_tokens_total",
                 "lmx_prefix_cache_evictions_total", "lmx_prefix_cache_bytes", "lmx_prefix_cache_disk_bytes"):
        assert f'{name}{{model="cached"}}' in text, name


def test_status_has_the_cache_figures_from_ready_on_also_after_a_restart(make_supervisor, model32: Path) -> None:
    # The worker's Ready carries them: no window, after a start or a restart, where a READY model's
    # status lacks them until its first heartbeat.
    s = make_supervisor([{"id": "m", "path": str(model32), "prefix_cache_persist": False}],
                        supervisor={"heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 10.0}).start()
    first = s.model("m")
    assert {"bytes", "entries", "budget_bytes"} <= first["prefix_cache"].keys(), first["prefix_cache"]
    os.kill(first["worker_pid"], signal.SIGKILL)
    m = s.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] != first["worker_pid"], 60,
                     "READY on a new worker")
    assert {"bytes", "entries", "budget_bytes"} <= m["prefix_cache"].keys(), m["prefix_cache"]


def test_a_small_budget_evicts_and_is_never_exceeded(make_supervisor, model32: Path) -> None:
    budget = 400_000  # about one of these prompts' KV (float32, 2 layers)
    s = make_supervisor([{"id": "small", "path": str(model32), "prefix_cache_bytes": budget,
                          "prefix_cache_persist": False}]).start()
    seen = 0  # prompt tokens the worker has accounted for (hit or miss), per its heartbeats
    for i in range(4):
        s.client.complete("small", f"{i} " + SUFFIXES[i] * 60, max_tokens=4)
        # Status carries the worker's figures as of its last heartbeat: wait for the one after this request.
        pc = s.wait_model("small", lambda m: _looked_up(m) > seen, 10, f"request {i} in the heartbeat")["prefix_cache"]
        seen = _looked_up({"prefix_cache": pc})
        assert pc["bytes"] <= budget
    assert pc["evictions"] >= 2 and "disk_entries" not in pc


def _looked_up(model: dict) -> int:
    pc = model["prefix_cache"]
    return pc.get("hit_tokens", 0) + pc.get("miss_tokens", 0)


def _disk_entries(state: Path, model: str) -> list[Path]:
    return sorted((state / "prefix-cache" / model).glob("*.safetensors"))


def test_hot_prefixes_survive_a_killed_worker(make_supervisor, model32: Path) -> None:
    s = make_supervisor([{"id": "p", "path": str(model32)},
                         {"id": "plain", "path": str(model32), "prefix_cache_bytes": 0}]).start()
    prompt = BASE + SUFFIXES[2]
    first = s.client.complete("p", prompt, max_tokens=8)
    m = s.wait_model("p", lambda m: m["prefix_cache"].get("disk_writes", 0) >= 1, 30, "the entry on disk")
    files = _disk_entries(s.state_dir, "p")
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    old_pid = m["worker_pid"]
    os.kill(old_pid, signal.SIGKILL)
    s.wait_model("p", lambda m: m["state"] == "READY" and m["worker_pid"] not in (None, old_pid), 60,
                 "READY again with a new worker")
    follow = prompt + first.text + " And then?"
    hit, ref = s.client.complete("p", follow, max_tokens=12), s.client.complete("plain", follow, max_tokens=12)
    assert hit.text == ref.text
    assert hit.usage["cached_tokens"] >= first.usage["prompt_tokens"] - 1
    assert [e for e in s.events("worker.prefix_cache_loaded") if e.get("model") == "p"]


def test_a_corrupt_or_foreign_file_is_dropped_never_used(make_supervisor, model32: Path, tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "own", dtype="float32", scale=0.3)  # its mtime is ours to change
    s = make_supervisor([{"id": "p", "path": str(model)}]).start()
    prompt = BASE + SUFFIXES[3]
    s.client.complete("p", prompt, max_tokens=4)
    s.wait_model("p", lambda m: m["prefix_cache"].get("disk_writes", 0) >= 1, 30, "the entry on disk")
    (good,) = _disk_entries(s.state_dir, "p")
    garbage = good.with_name("0" * 32 + ".safetensors")
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    shard = model / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the weights changed: old KV is foreign
    pid = s.model("p")["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    s.wait_model("p", lambda m: m["state"] == "READY" and m["worker_pid"] not in (None, pid), 60, "READY again")
    dropped = wait_until(lambda: {e["reason"].split(":")[0] for e in s.events("worker.prefix_cache_dropped")}
                         if len(s.events("worker.prefix_cache_dropped")) >= 2 else None, 30, "both files dropped")
    assert dropped == {"unreadable", "weights differs"}
    again = s.client.complete("p", prompt, max_tokens=4)
    assert again.usage["cached_tokens"] < 16
    assert s.model("p")["state"] == "READY"


def test_lmxctl_cache_clear_removes_the_files(make_supervisor, model32: Path) -> None:
    s = make_supervisor([{"id": "p", "path": str(model32)}]).start()
    s.client.complete("p", BASE + SUFFIXES[1], max_tokens=4)
    s.wait_model("p", lambda m: m["prefix_cache"].get("disk_writes", 0) >= 1, 30, "the entry on disk")
    out = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(s.state_dir), "cache", "clear",
                          "p", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"files": 1' in out.stdout
    assert _disk_entries(s.state_dir, "p") == []
    m = s.wait_model("p", lambda m: m["prefix_cache"]["entries"] == 0, 30, "the worker's entries gone")
    assert m["prefix_cache"]["disk_entries"] == 0
    again = s.client.complete("p", BASE + SUFFIXES[1], max_tokens=4)
    assert again.usage["cached_tokens"] < 16


def test_a_lone_request_hung_inside_mlx_is_worker_hung(make_supervisor, tiny_model: Path) -> None:
    # The default batch size: the lone request runs on generate_step, and hangs in its first step.
    s = make_supervisor([{"id": "h", "path": str(tiny_model), "worker_command": [
        sys.executable, "-m", "tests.chaos_worker", "--at", "step", "--after", "1"]}],
        supervisor={"prefill_stall_s": 2.0, "decode_stall_s": 2.0}).start()
    with pytest.raises(E.WorkerHung):
        s.client.complete("h", "Hello there", max_tokens=8)
    crash = wait_until(lambda: s.client.history("h"), 30, "the crash record")
    assert crash[0]["code"] == "WORKER_HUNG" and crash[0].get("phase")
