"""What the benchmarks share about the daemon they start: waiting until every model is READY."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from protocol.client import SupervisorClient


async def wait_ready(state: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with SupervisorClient(state_dir=state) as client:
                if all(m["state"] == "READY" for m in (await client.status())["models"]):
                    return
        except Exception:  # not up yet: the socket appears a moment after the process starts
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"the supervisor in {state} did not get its models READY within {timeout_s:.0f}s")
