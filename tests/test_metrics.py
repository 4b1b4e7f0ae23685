"""Prometheus metrics from a real supervisor: the HTTP endpoint and `lmxctl metrics` parse with
prometheus_client's own parser, carry what happened (requests, tokens, latencies, a crash), and every
alert rule in docs/alerts.yaml names a metric the supervisor exposes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    (match,) = [s for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return match.value


def test_metrics_endpoint_and_alert_rules(make_supervisor, tiny_model: Path) -> None:
    port = _free_port()
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}],
                          supervisor={"metrics_port": port}).start()
    sup.client.complete("m", "Hello", max_tokens=4)
    sup.client.complete("m", "Hello again", max_tokens=3)
    try:
        sup.client.complete("nope", "x")
    except Exception:
        pass
    pid = sup.model("m")["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    sup.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "READY again")

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        samples = _samples(resp.read().decode())
    assert _value(samples, "lmx_model_state", model="m", state="READY") == 1
    assert _value(samples, "lmx_model_state", model="m", state="QUARANTINED") == 0
    assert _value(samples, "lmx_requests_total", model="m", outcome="ok") == 2
    assert _value(samples, "lmx_requests_total", model="", outcome="UNKNOWN_MODEL") == 1
    assert _value(samples, "lmx_generated_tokens_total", model="m") >= 2
    assert _value(samples, "lmx_time_to_first_token_seconds_count", model="m") == 2
    assert _value(samples, "lmx_worker_crashes_total", model="m", classification="WORKER_CRASHED") == 1
    assert _value(samples, "lmx_model_restarts_total", model="m") == 1
    assert _value(samples, "lmx_model_quarantined", model="m") == 0
    assert _value(samples, "lmx_worker_rss_bytes", model="m") > 10 * 2**20
    assert _value(samples, "lmx_supervisor_rss_bytes") > 0
    assert _value(samples, "lmx_supervisor_client_connections") >= 1
    assert _value(samples, "lmx_store_write_seconds_count") > 0

    # lmxctl metrics: the same exposition over the control socket.
    out = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "metrics"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "lmx_model_state" in _samples(out.stdout)

    # Every alert rule names only metrics that exist (the original's named some it never emitted).
    exposed = set(samples)
    rules = yaml.safe_load((REPO / "docs" / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert len(rules) >= 10
    for rule in rules:
        names = set(re.findall(r"\b(lmx_[a-z_]+)", rule["expr"]))
        assert names, rule["alert"]
        missing = names - exposed
        assert not missing, f"{rule['alert']} names metrics the supervisor does not expose: {missing}"


def test_a_metrics_port_in_use_is_a_fatal_non_zero_exit(tmp_path: Path, tiny_model: Path) -> None:
    """Never a clean-looking exit after a failure: launchd/systemd must see it and restart us."""
    from tests.harness import render_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "lmx.toml"
        config.write_text(render_config([{"id": "m", "path": str(tiny_model)}],
                                        {"supervisor": {"metrics_port": port}}))
        proc = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config),
                               "--state-dir", str(tmp_path / "state")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 70, proc.stderr[-2000:]
    assert "lmx-supervisor: fatal:" in proc.stderr
    assert '"event": "supervisor.fatal"' in (tmp_path / "state" / "logs" / "supervisor.log").read_text()
