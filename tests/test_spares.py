"""Warm spares: a restart after a crash takes a pre-started worker (interpreter up, mlx-lm imported)
instead of spawning one, the pool refills, and nothing is left running at shutdown."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.harness import wait_until, workers_of


def test_a_crash_restart_takes_a_warm_spare_and_the_pool_refills(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}], supervisor={"warm_spares": 1}).start()
    wait_until(lambda: sup.status()["supervisor"]["warm_spares"]["ready"] == 1, 30, "a ready spare")
    first = sup.model("m")["worker_pid"]
    spares = workers_of(sup.state_dir) - {first}
    assert len(spares) == 1
    (spare,) = spares

    os.kill(first, signal.SIGKILL)
    m = sup.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] != first, 30, "READY again")
    assert m["worker_pid"] == spare  # the spare became the model's worker
    assert [e["worker_pid"] for e in sup.events("worker.from_spare")] == [spare]
    assert (sup.state_dir / "logs" / f"worker-m-{spare}.log").exists()  # its log took the model's name
    assert sup.client.complete("m", "Hello", max_tokens=3).usage["completion_tokens"] >= 1

    wait_until(lambda: sup.status()["supervisor"]["warm_spares"]["ready"] == 1, 30, "the pool refilled")
    assert len(workers_of(sup.state_dir)) == 2  # the model's worker and one new spare
    assert sup.stop() == 0
    wait_until(lambda: not workers_of(sup.state_dir), 15, "every worker and spare stopped")
