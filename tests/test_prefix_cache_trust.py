"""The prefix cache's files are not trusted (issue 23, findings 3 and 4), end to end: a real
supervisor, real workers and mlx-lm on a float32 tiny llama, real files in the cache dir. A file that
is not a regular file, does not fit the model, or does not match its checksum costs only itself (the
request that would have used it prefills in full, with the output of a model whose cache is off),
and `lmxctl cache clear` is a barrier: nothing queued for the disk before it lands after it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from protocol.client import SupervisorClient
from tests.harness import RunningSupervisor, wait_until
from tests.snapshots import write_tiny_llama
from tests.test_prefix_cache import BASE, SUFFIXES

pytestmark = pytest.mark.timeout(300)

LOAD_TIMEOUT_S = 30.0  # a worker's load: a cache file that blocks it fails the test, not the suite
# One entry of these prompts' length fits the memory budget, two do not: the second evicts the
# first from memory, so the next request for the first reads its file.
MEMORY_BUDGET = 1_200_000


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny32", dtype="float32", scale=0.3)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, model32: Path):
    s = RunningSupervisor(
        tmp_path_factory.mktemp("trust"),
        [{"id": "p", "path": str(model32), "prefix_cache_bytes": MEMORY_BUDGET},
         {"id": "plain", "path": str(model32), "prefix_cache_bytes": 0}],
        supervisor={"load_timeout_s": LOAD_TIMEOUT_S},
    ).start()
    yield s
    s.cleanup()


def _dir(s: RunningSupervisor, model: str = "p") -> Path:
    return s.state_dir / "prefix-cache" / model


def _entries(s: RunningSupervisor, model: str = "p") -> list[Path]:
    return sorted(p for p in _dir(s, model).glob("*.safetensors") if not p.name.startswith(".tmp-"))


def _tokens_of(path: Path) -> list[int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(json.loads(f.read(n))["__metadata__"]["0.tokens"])


def _stored(s: RunningSupervisor, prompt: str, max_tokens: int = 4) -> tuple[object, Path]:
    """Serve `prompt` on "p" and wait for its entry on disk: (the result, the file)."""
    result = s.client.complete("p", prompt, max_tokens=max_tokens)
    n = result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    return result, wait_until(lambda: next((p for p in _entries(s) if len(_tokens_of(p)) == n), None), 30,
                              "the entry on disk")


def _restart(s: RunningSupervisor, model: str = "p") -> dict:
    pid = s.model(model)["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    return s.wait_model(model, lambda m: m["state"] == "READY" and m["worker_pid"] not in (None, pid),
                        LOAD_TIMEOUT_S + 10, "READY on a new worker")


def _drops(s: RunningSupervisor, name: str) -> list[str]:
    return [e["reason"] for e in s.events("worker.prefix_cache_dropped") if e.get("file") == name]


def _together(s: RunningSupervisor, model: str, prompts: list[str], max_tokens: int = 12) -> list:
    async def run() -> list:
        async with SupervisorClient(state_dir=s.state_dir) as client:
            return await asyncio.gather(*(client.complete(model, p, max_tokens=max_tokens) for p in prompts))

    return asyncio.run(run())


def _rewrite(path: Path, change) -> None:
    """The file with its arrays passed through `change` (a dict of flat key -> mlx array), its
    metadata kept, and a checksum that matches the new arrays: only the layout check can refuse it."""
    import mlx.core as mx

    from worker.prefixfile import checksum

    arrays, meta = mx.load(str(path), return_metadata=True)
    arrays = {k: mx.contiguous(v) for k, v in change(dict(arrays)).items()}
    mx.eval(list(arrays.values()))
    meta["0.checksum"] = checksum(arrays)
    mx.save_safetensors(str(path), arrays, meta)


def test_a_fifo_a_symlink_or_a_directory_never_blocks_the_load_and_is_skipped(sup: RunningSupervisor,
                                                                                tmp_path: Path) -> None:
    prompt = "Fifo and links. " + BASE
    _, good = _stored(sup, prompt)
    outside = tmp_path / "outside.safetensors"
    os.replace(good, outside)  # a valid entry, now outside the cache dir, behind a link
    link = good
    link.symlink_to(outside)
    fifo = _dir(sup) / ("f" * 32 + ".safetensors")
    os.mkfifo(fifo)
    folder = _dir(sup) / ("d" * 32 + ".safetensors")
    folder.mkdir()
    start = time.monotonic()
    _restart(sup)
    assert time.monotonic() - start < LOAD_TIMEOUT_S
    assert _drops(sup, fifo.name) == ["a FIFO, not a regular file"]
    assert _drops(sup, link.name) == ["a symlink, not a regular file"]
    assert _drops(sup, folder.name) == ["a directory, not a regular file"]
    assert not os.path.lexists(fifo) and not os.path.lexists(link) and not folder.exists()
    assert outside.is_file()  # the link went, never what it pointed to
    hit, ref = sup.client.complete("p", prompt, max_tokens=8), sup.client.complete("plain", prompt, max_tokens=8)
    assert hit.text == ref.text and hit.usage["cached_tokens"] < 16  # the linked entry was never read


def test_arrays_that_do_not_fit_the_model_cost_only_their_own_entry(sup: RunningSupervisor) -> None:
    import mlx.core as mx

    first = "Wrong shapes. " + BASE
    _, path = _stored(sup, first)
    _stored(sup, "Evict it. " + SUFFIXES[3] * 150)  # the first entry leaves memory: its next hit reads the file
    # Metadata, classes and checksum as a real entry has them, but heads of half the model's size.
    _rewrite(path, lambda a: {k: v[..., : v.shape[-1] // 2] if v.ndim == 4 else v for k, v in a.items()})
    pid = sup.model("p")["worker_pid"]
    prompts = [first + SUFFIXES[0], "Another client. " + SUFFIXES[1] * 40]
    hits, refs = _together(sup, "p", prompts), _together(sup, "plain", prompts)
    assert [h.text for h in hits] == [r.text for r in refs]
    assert hits[0].usage["cached_tokens"] < 16  # a full prefill, not the file
    (reason,) = _drops(sup, path.name)
    assert reason.startswith("cannot load: does not fit the model: array ") and "has shape [1, 2, " in reason
    assert not path.exists()
    m = sup.model("p")
    assert m["state"] == "READY" and m["worker_pid"] == pid  # no batch failed, no worker died
    assert not [e for e in sup.events("worker.batch_failed") if e.get("model") == "p"]


def test_right_shapes_with_wrong_values_fail_the_checksum_and_are_dropped(sup: RunningSupervisor) -> None:
    prompt = "Flipped bytes. " + BASE
    _, path = _stored(sup, prompt)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    body = 8 + n  # the header stays as it was: only array bytes change
    for i in range(body + 64, len(data) - 64, 97):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    _restart(sup)  # a scan reads headers only: this file passes it, its first use must not
    follow = prompt + SUFFIXES[2]
    hit, ref = sup.client.complete("p", follow, max_tokens=12), sup.client.complete("plain", follow, max_tokens=12)
    assert hit.text == ref.text and hit.usage["cached_tokens"] < 16
    (reason,) = _drops(sup, path.name)
    assert reason.startswith("cannot load: checksum mismatch")
    assert not path.exists()


# Entries of ~16 MB each (float32, 6 layers of 8 KV heads of 64, ~650 tokens): a batch of them keeps
# the disk writer busy for a while after the clients have their answers. Short prompts and long
# answers (this model repeats one token: every answer runs to max_tokens): cheap to compute.
WIDE = {"hidden_size": 512, "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 8}
WRITTEN_TOKENS = 250


def test_cache_clear_is_a_barrier_for_the_writes_queued_and_under_way(make_supervisor, tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "wide", dtype="float32", shape=WIDE)
    s = make_supervisor([{"id": "w", "path": str(model), "prefix_cache_bytes": 100 * 2**20,
                          "prefix_cache_disk_bytes": 2**31}]).start()
    before = [f"Writer {i}: " + SUFFIXES[i % 4] * 12 for i in range(6)]

    async def clear_while_writing() -> tuple[list, list[Path]]:
        async with SupervisorClient(state_dir=s.state_dir) as client:
            # While the worker steps a request of its own (too short ever to be written), the others
            # join its batch together, so they finish in one step and their entries queue up.
            busy = client.generate("w", "Busy.", max_tokens=200)
            async for _ in busy:
                break
            results = await asyncio.gather(*(client.complete("w", p, max_tokens=WRITTEN_TOKENS) for p in before))
            await client.clear_cache("w")  # the answers are out; their entries are being written
            on_disk = _entries(s, "w")
            await busy.aclose()
            return results, on_disk

    results, right_after = asyncio.run(clear_while_writing())
    assert right_after == []
    # One entry after the clear, then: once it is on disk, the writer has done all it had before it.
    after = "After the clear, a new conversation. " + SUFFIXES[0] * 12
    fresh = s.client.complete("w", after, max_tokens=WRITTEN_TOKENS // 2)
    n = fresh.usage["prompt_tokens"] + fresh.usage["completion_tokens"]
    assert n != results[0].usage["prompt_tokens"] + results[0].usage["completion_tokens"]
    wait_until(lambda: [e for e in s.events("worker.prefix_cache_saved") if e.get("model") == "w" and e["tokens"] == n],
               60, "the entry made after the clear on disk")
    assert [len(_tokens_of(p)) for p in _entries(s, "w")] == [n]  # nothing from before the clear landed
    (cleared,) = [e for e in s.events("worker.prefix_cache_cleared") if e.get("model") == "w"]
    failed = [e for e in s.events("worker.prefix_cache_write_failed") if e.get("model") == "w"]
    assert cleared["queued_writes"] + len(failed) >= 1, "the clear did not meet the writer at work"
    _restart(s, "w")
    for prompt in before[:3]:
        assert s.client.complete("w", prompt, max_tokens=2).usage["cached_tokens"] < 16  # forgotten
    assert s.client.complete("w", after, max_tokens=2).usage["cached_tokens"] >= fresh.usage["prompt_tokens"] - 1


def test_a_generation_running_across_a_clear_stores_nothing(sup: RunningSupervisor) -> None:
    prompt = BASE + SUFFIXES[2] + " Across a clear."

    async def run() -> None:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            stream = client.generate("p", prompt, max_tokens=64)
            async with stream:
                async for _ in stream:  # the first chunk: the generation is under way
                    break
                await client.clear_cache("p")
                async for _ in stream:  # it finishes after the clear
                    pass

    asyncio.run(run())
    again = sup.client.complete("p", prompt, max_tokens=2)
    assert again.usage["cached_tokens"] < 16, "a generation that began before the clear left an entry"
    assert sup.client.complete("p", prompt, max_tokens=2).usage["cached_tokens"] >= 16  # stored as usual since
