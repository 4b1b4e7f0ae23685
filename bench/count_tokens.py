"""count_tokens latency (client -> supervisor -> worker -> back) on the tiny random llama, for a short
chat prompt and a long (~2,000-token) one, with the worker idle and while it decodes a batch of 4,
beside a generate(max_tokens=1) of the same prompt (each one a fresh prompt: no prefix cache hit).
Prints JSON and a table. LMX_BENCH_COUNTS sets how many counts per case (default 200)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.client import SupervisorClient  # noqa: E402
from tests.harness import RunningSupervisor  # noqa: E402
from tests.snapshots import write_tiny_llama  # noqa: E402

COUNTS = int(os.environ.get("LMX_BENCH_COUNTS", "200"))
GENERATES = 20


def _messages(words: int, salt: int = 0) -> list[dict]:
    return [{"role": "system", "content": f"Session {salt}. You are terse."},
            {"role": "user", "content": " ".join(f"word{i % 50}" for i in range(words))}]


def _ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
            "n": len(ordered)}


async def _counts(client: SupervisorClient, messages: list[dict]) -> list[float]:
    out = []
    for _ in range(COUNTS):
        start = time.perf_counter()
        await client.count_tokens("m", messages=messages)
        out.append(time.perf_counter() - start)
    return out


async def _generates(client: SupervisorClient, words: int) -> list[float]:
    out = []
    for i in range(GENERATES):
        messages = _messages(words, salt=1000 + i)  # a fresh prompt each time: a real prefill
        start = time.perf_counter()
        await client.complete("m", messages=messages, max_tokens=1)
        out.append(time.perf_counter() - start)
    return out


async def _busy(client: SupervisorClient, messages: list[dict]) -> tuple[list[float], bool]:
    """Counts while 4 streams decode; whether all 4 were still running after the last count."""
    streams = [client.generate("m", f"Story {i}:", max_tokens=1500) for i in range(4)]
    for s in streams:
        await s.__anext__()
    samples = await _counts(client, messages)
    running = all(s.result is None for s in streams)
    for s in streams:
        await s.aclose()
    return samples, running


async def measure(state: Path) -> dict:
    out: dict = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
                 "counts_per_case": COUNTS}
    async with SupervisorClient(state_dir=state) as client:
        for name, words in (("short", 12), ("long", 520)):
            messages = _messages(words)
            tokens = await client.count_tokens("m", messages=messages)
            for _ in range(10):  # warm: the template compiled, the sockets hot
                await client.count_tokens("m", messages=messages)
            idle = await _counts(client, messages)
            busy, running = await _busy(client, messages)
            gen = await _generates(client, words)
            out[name] = {"prompt_tokens": tokens, "count_idle": _ms(idle), "count_while_decoding": _ms(busy),
                         "batch_still_decoding": running, "generate_max_tokens_1": _ms(gen)}
    return out


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="lmx-bench-count-"))
    model = write_tiny_llama(root / "tiny")
    sup = RunningSupervisor(root / "sup", [{"id": "m", "path": str(model), "max_batch_size": 8,
                                            "context_tokens": 4096}]).start()
    try:
        result = asyncio.run(measure(sup.state_dir))
    finally:
        sup.cleanup()
    print(json.dumps(result, indent=2))
    print(f"\n{'prompt':<8}{'tokens':>8}{'count idle p50/p99 ms':>24}{'count busy p50/p99 ms':>24}"
          f"{'generate(1) p50/p99 ms':>25}")
    for name in ("short", "long"):
        r = result[name]
        cells = [f"{r[k]['p50_ms']:.2f} / {r[k]['p99_ms']:.2f}"
                 for k in ("count_idle", "count_while_decoding", "generate_max_tokens_1")]
        print(f"{name:<8}{r['prompt_tokens']:>8}{cells[0]:>24}{cells[1]:>24}{cells[2]:>25}")


if __name__ == "__main__":
    main()
