"""Processes a benchmark starts and must stop whatever happens: the supervisor, lmx-gateway and
mlx_lm.server, each in its own process group, on 127.0.0.1 only, every wait with a deadline; and
the float32 tiny snapshot that long prompts need."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import workers_of  # noqa: E402
from tests.snapshots import write_safetensors, write_tiny_llama  # noqa: E402


def tiny_float32(dest: Path, max_positions: int = 8192) -> Path:
    """The test suite's tiny llama, in float32 and with room for long prompts. On mlx's CPU backend a
    float16 prefill of 2,700 tokens takes ~2-3x as long as float32 (no native half matmul), which
    would bury the cache's effect under the slowest part of the machine."""
    try:
        dest = write_tiny_llama(dest, dtype="float32")
    except TypeError:  # a test suite from before write_tiny_llama took a dtype
        dest = write_tiny_llama(dest)
        weights = load_file(str(dest / "model.safetensors"))
        write_safetensors(dest / "model.safetensors", {k: v.astype(np.float32) for k, v in weights.items()},
                          {"format": "mlx"})
    for name, changes in (("config.json", {"torch_dtype": "float32", "max_position_embeddings": max_positions}),
                          ("tokenizer_config.json", {"model_max_length": max_positions})):
        cfg = json.loads((dest / name).read_text())
        cfg.update(changes)
        (dest / name).write_text(json.dumps(cfg, indent=2))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(cmd: list[str], log: Path | None, **kwargs) -> subprocess.Popen:
    # A session of its own: stop() can signal the whole group, children included.
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, cwd=REPO, stderr=err, start_new_session=True, **kwargs)
    finally:
        if log:
            err.close()


def start_supervisor(config: Path, state: Path, log: Path | None = None) -> subprocess.Popen:
    return _popen([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config),
                   "--state-dir", str(state)], log)


def start_gateway(state: Path, log: Path | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """lmx-gateway on a free loopback port; returns the process and its base URL, once it listens."""
    gw = _popen([sys.executable, "-m", "gateway.cli", "--port", "0", "--state-dir", str(state)], log,
                stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([gw.stdout], [], [], timeout_s)
    line = gw.stdout.readline() if ready else ""
    if not line.startswith("lmx-gateway listening on "):
        stop(gw)
        raise SystemExit(f"gateway did not start: {line!r}")
    return gw, line.split()[-1]


def start_mlx_lm_server(model: Path, log: Path | None = None, timeout_s: float = 120.0,
                        extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """mlx_lm.server on a free loopback port; returns once GET /health answers."""
    port = free_port()
    proc = _popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), *extra], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlx_lm.server exited {proc.returncode}: {_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"mlx_lm.server did not answer /health within {timeout_s:.0f}s: {_tail(log)}")


def _tail(log: Path | None) -> str:
    # The log sits in the benchmark's temporary directory, gone by the time anyone reads the error.
    return log.read_text(errors="replace")[-800:] if log and log.exists() else ""


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group, SIGKILL to it past the deadline."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def stop_supervisor(proc: subprocess.Popen, state: Path) -> None:
    """Workers run in sessions of their own and outlive a supervisor by design (adoption): a
    supervisor that did not stop them cleanly leaves them for us."""
    stop(proc, timeout_s=60.0)
    for pid in workers_of(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
