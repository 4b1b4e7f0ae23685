"""Logs: secret redaction by exact key, size rotation, and `lmxctl logs` (filters, formats, follow)."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog

from lmxctl import cli as ctl, logview
from supervisor import cli, logs
from tests.harness import REPO, wait_until

NOW = datetime.now(timezone.utc)


@pytest.fixture
def restore_logging():
    """configure() is process-global: put structlog and the "lmx" logger back as they were."""
    saved = structlog.get_config()
    root = logging.getLogger("lmx")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = propagate
    structlog.configure(**saved)


# --- redaction ------------------------------------------------------------------------------------

def test_redaction_is_by_exact_key_case_insensitive_at_any_depth() -> None:
    event = {
        "event": "x", "token": "t1", "Authorization": "Bearer t2", "HF_TOKEN": "t3", "password": "t4",
        "max_tokens": 16, "prompt_tokens": 3, "tokens_per_s": 9.5, "tokens": 4, "token_count": 2,
        "secrets": "plural is not a secret key", "key": "k",
        "nested": {"api_key": "t5", "usage": {"completion_tokens": 5, "Secret_Key": "t6"},
                   "items": [{"private_key": "t7", "max_tokens": 8}, ("token", "a value, not a key")]},
    }
    before = copy.deepcopy(event)
    out = logs.redact_secrets(None, "info", event)
    assert event == before, "the caller's dicts are not edited in place"
    for key in ("token", "Authorization", "HF_TOKEN", "password"):
        assert out[key] == "[redacted]"
    assert out["nested"]["api_key"] == out["nested"]["usage"]["Secret_Key"] == "[redacted]"
    assert out["nested"]["items"][0] == {"private_key": "[redacted]", "max_tokens": 8}
    assert out["nested"]["items"][1] == ("token", "a value, not a key")
    for key in ("max_tokens", "prompt_tokens", "tokens_per_s", "tokens", "token_count", "secrets", "key"):
        assert out[key] == event[key]
    assert out["nested"]["usage"]["completion_tokens"] == 5


def test_rendered_log_lines_carry_no_secret(tmp_path: Path, restore_logging) -> None:
    logs.configure(tmp_path, "info")
    logs.get(model="m").info("request.done", max_tokens=16, token="tok-123",
                             detail={"curve_secret_key": "curve-456", "prompt_tokens": 7})
    text = (tmp_path / "logs" / logs.LOG_FILE).read_text()
    assert "tok-123" not in text and "curve-456" not in text
    record = json.loads(text.splitlines()[-1])
    assert record["token"] == record["detail"]["curve_secret_key"] == "[redacted]"
    assert record["max_tokens"] == 16 and record["detail"]["prompt_tokens"] == 7


# --- rotation -------------------------------------------------------------------------------------

def test_the_log_rotates_by_size_and_keeps_n_files(tmp_path: Path, restore_logging) -> None:
    logs.configure(tmp_path, "info", max_bytes=2000, backups=3)
    log = logs.get(model="m")
    for i in range(300):
        log.info("model.state", i=i, reason="x" * 40)
    log_dir = tmp_path / "logs"
    assert sorted(p.name for p in log_dir.iterdir()) == [
        "supervisor.log", "supervisor.log.1", "supervisor.log.2", "supervisor.log.3"]
    numbers = []
    for name in ("supervisor.log.3", "supervisor.log.2", "supervisor.log.1", "supervisor.log"):
        assert (log_dir / name).stat().st_size <= 2000
        numbers += [json.loads(line)["i"] for line in (log_dir / name).read_text().splitlines()]
    assert numbers == list(range(numbers[0], 300)), "oldest file first, nothing lost between kept files"
    assert numbers[0] > 0, "older lines were rotated away"


def test_lmx_supervisor_run_passes_the_configured_rotation(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "lmx.toml"
    config.write_text("[supervisor]\nlog_max_bytes = 1234\nlog_backups = 2\n")
    seen = {}

    class NoDaemon:
        def __init__(self, *_args) -> None:
            pass

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "Supervisor", NoDaemon)
    monkeypatch.setattr(logs, "configure", lambda *a, **kw: seen.update(args=a, kwargs=kw))
    assert cli.main(["run", "--config", str(config), "--state-dir", str(tmp_path / "state")]) == 0
    assert seen["kwargs"] == {"max_bytes": 1234, "backups": 2, "stderr_level": "debug"}


# --- lmxctl logs on synthetic files -----------------------------------------------------------------

def rec(ago_s: float, level: str, event: str, model: str | None = None, **fields) -> str:
    ts = (NOW - timedelta(seconds=ago_s)).isoformat().replace("+00:00", "Z")
    return json.dumps({**({"model": model} if model else {}), **fields, "event": event, "level": level, "ts": ts})


OLDEST = [rec(3 * 3600, "info", "model.state", "a", to="STARTING"),
          rec(3 * 3600 - 1, "error", "model.failed", "b", code="WORKER_CRASHED")]
OLDER = [rec(5400, "info", "model.state", "b", to="READY"),
         rec(5399, "warning", "worker.stop", "a", step="sigterm")]
# NOW is taken when the module is collected; a full suite may reach these tests many minutes later,
# so every relative window below leaves half an hour of room on each side of its boundary.
CURRENT = [rec(120, "info", "request.done", "a", request_id="r1", max_tokens=16),
           "Fatal Python error: not a JSON line",
           rec(119, "debug", "worker.output", "a", line="hello"),
           rec(118, "critical", "internal.task_failed", "b", error="boom")]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    for name, lines in (("supervisor.log.2", OLDEST), ("supervisor.log.1", OLDER), ("supervisor.log", CURRENT)):
        (log_dir / name).write_text("".join(line + "\n" for line in lines))
    return tmp_path


def lmxctl_logs(capsys, state_dir: Path, *args: str) -> tuple[int, list[str]]:
    rc = ctl.main(["--state-dir", str(state_dir), "logs", *args])
    return rc, capsys.readouterr().out.splitlines()


def test_since_reaches_back_through_rotated_files_oldest_first_raw_with_json(capsys, state_dir: Path) -> None:
    assert lmxctl_logs(capsys, state_dir, "--json", "--since", "1d") == (0, OLDEST + OLDER + CURRENT)
    assert lmxctl_logs(capsys, state_dir, "--json", "--since", "2h") == (0, OLDER + CURRENT)
    assert lmxctl_logs(capsys, state_dir, "--json", "--since", "60m") == (0, CURRENT)
    iso = (NOW - timedelta(minutes=100)).isoformat()
    assert lmxctl_logs(capsys, state_dir, "--json", "--since", iso) == (0, OLDER + CURRENT)
    naive_local = (NOW - timedelta(minutes=100)).astimezone().replace(tzinfo=None).isoformat()
    assert lmxctl_logs(capsys, state_dir, "--json", "--since", naive_local) == (0, OLDER + CURRENT)


def test_filter_by_model_and_minimum_level(capsys, state_dir: Path) -> None:
    junk = CURRENT[1]  # a line that is not JSON is never filtered away: it is shown as it is
    rc, out = lmxctl_logs(capsys, state_dir, "--json", "--since", "1d", "--model", "b")
    assert (rc, out) == (0, [OLDEST[1], OLDER[0], junk, CURRENT[3]])
    rc, out = lmxctl_logs(capsys, state_dir, "--json", "--since", "1d", "--level", "warning")
    assert (rc, out) == (0, [OLDEST[1], OLDER[1], junk, CURRENT[3]])
    rc, out = lmxctl_logs(capsys, state_dir, "--json", "--since", "1d", "--model", "a", "--level", "info")
    assert (rc, out) == (0, [OLDEST[0], OLDER[1], CURRENT[0], junk])


def test_n_shows_the_last_n_matches_default_50(capsys, state_dir: Path) -> None:
    assert lmxctl_logs(capsys, state_dir, "--json", "-n", "2", "--model", "a") == (0, CURRENT[1:3])
    assert lmxctl_logs(capsys, state_dir, "--json", "-n", "4", "--model", "a") == (0, [OLDER[1], *CURRENT[:3]])
    assert lmxctl_logs(capsys, state_dir, "--json", "-n", "0") == (0, [])
    many = [rec(100 - i / 10, "info", "request.done", "a", i=i) for i in range(120)]
    with open(state_dir / "logs" / "supervisor.log", "a") as fh:
        fh.write("".join(line + "\n" for line in many))
    assert lmxctl_logs(capsys, state_dir, "--json") == (0, many[-50:])


def test_human_format_one_line_per_event(capsys, state_dir: Path) -> None:
    line = json.dumps({"model": "m", "worker_pid": 42, "step": "sigterm", "reason": "failed: WORKER_HUNG",
                       "retry": None, "files": ["a b"], "event": "worker.stop", "level": "warning",
                       "ts": "2024-05-01T12:34:56.789012Z"})
    clock = datetime(2024, 5, 1, 12, 34, 56, 789012, timezone.utc).astimezone().strftime("%H:%M:%S.%f")[:-3]
    assert logview.format_line(line) == (f'{clock} WARNING m worker.stop worker_pid=42 step=sigterm '
                                         f'reason="failed: WORKER_HUNG" retry=null files=["a b"]')
    bare = json.dumps({"event": "internal.control_failed", "level": "error", "ts": "2024-05-01T12:34:56Z",
                       "exception": "Traceback (most recent call last):\nValueError: x"})
    assert logview.format_line(bare).splitlines() == [
        f"{clock[:8]}.000 ERROR   - internal.control_failed", "    Traceback (most recent call last):",
        "    ValueError: x"]
    assert "\033[" in logview.format_line(line, colour=True)
    rc, out = lmxctl_logs(capsys, state_dir, "-n", "1", "--level", "critical")
    assert rc == 0 and len(out) == 1 and "\033[" not in out[0]
    assert out[0].split(" ", 1)[1] == "CRITICAL b internal.task_failed error=boom"


def test_colour_only_on_a_tty_without_no_color(capsys, state_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\033[" in lmxctl_logs(capsys, state_dir, "-n", "1")[1][0]
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033[" not in lmxctl_logs(capsys, state_dir, "-n", "1")[1][0]


def test_since_parsing_and_usage_errors(capsys, tmp_path: Path) -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    for text, delta in (("30s", timedelta(seconds=30)), ("10m", timedelta(minutes=10)),
                        ("2h", timedelta(hours=2)), ("1d", timedelta(days=1)), ("1.5h", timedelta(minutes=90))):
        assert logview.parse_since(text, now) == now - delta
    assert logview.parse_since("2024-05-01T11:00:00Z") == datetime(2024, 5, 1, 11, tzinfo=timezone.utc)
    with pytest.raises(SystemExit) as exc:
        ctl.main(["--state-dir", str(tmp_path), "logs", "--since", "yesterday"])
    assert exc.value.code == 2
    assert ctl.main(["--state-dir", str(tmp_path), "logs"]) == 1
    assert "no log at" in capsys.readouterr().err


def test_state_dir_from_the_environment(capsys, state_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMX_STATE_DIR", str(state_dir))
    assert ctl.main(["logs", "--json", "-n", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [CURRENT[-1]]


# --- lmxctl logs as a process: follow, rotation, SIGPIPE, a real supervisor --------------------------

def _lmxctl(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmxctl", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


class Reader:
    """Collects a process's stdout lines on a thread, so a test can wait on them with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, line: str) -> None:
        wait_until(lambda: line in self.lines, 15, f"{line!r} from lmxctl logs -f (got {self.lines})")


@pytest.mark.timeout(60)
def test_follow_picks_up_appends_and_survives_rotation_and_truncation(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    path = log_dir / "supervisor.log"
    lines = {k: rec(0, "info", "model.state", "b" if k == "C" else "a", n=k, pad="x" * (200 if k == "F" else 0))
             for k in "ABCDEFG"}

    def append(target: Path, *keys: str) -> None:
        with open(target, "a") as fh:
            fh.write("".join(lines[k] + "\n" for k in keys))

    append(path, "A")
    proc = _lmxctl("--state-dir", str(tmp_path), "logs", "-f", "--json", "--model", "a")
    try:
        out = Reader(proc)
        out.wait_for(lines["A"])
        append(path, "B", "C", "D")  # C is model b: filtered out while following too
        out.wait_for(lines["D"])
        append(path, "E")  # written just before the rotation: read from the old file, not lost
        path.rename(log_dir / "supervisor.log.1")
        append(path, "F")
        out.wait_for(lines["F"])
        with open(path, "r+") as fh:  # same inode, shorter: read again from the start
            fh.truncate(0)
        append(path, "G")
        out.wait_for(lines["G"])
        assert out.lines == [lines[k] for k in "ABDEFG"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # seconds, not instant, on a loaded 2-core machine (a run saw 10 s pass)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_a_closed_pipe_ends_the_viewer_quietly(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    many = [rec(10, "info", "request.done", "a", i=i, pad="x" * 100) for i in range(3000)]
    (tmp_path / "logs" / "supervisor.log").write_text("".join(line + "\n" for line in many))
    proc = _lmxctl("--state-dir", str(tmp_path), "logs", "-n", "3000")
    try:
        assert proc.stdout.readline()
        proc.stdout.close()  # like `lmxctl logs | head -1`
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(240)
def test_lmxctl_logs_shows_a_real_supervisors_model_states(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}]).start()

    def up_to_ready() -> list[dict] | None:
        done = subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "logs",
                               "--model", "m", "--json", "--since", "1h"],
                              cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "LMX_STATE_DIR": "/nonexistent"})
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        states = [r for r in records if r["event"] == "model.state"]
        return records if states and states[-1]["to"] == "READY" else None

    records = wait_until(up_to_ready, 60, "model m READY in lmxctl logs")
    assert {r["model"] for r in records} == {"m"}
    states = [r for r in records if r["event"] == "model.state"]
    assert [r["to"] for r in states] == ["ADMITTING", "STARTING", "LOADING", "CANARY", "READY"]
    assert states == [r for r in sup.events("model.state") if r["model"] == "m"]


def test_old_worker_logs_are_pruned_at_start_but_never_a_live_workers(tmp_path: Path) -> None:
    import os
    import time as _time

    from supervisor.logs import WORKER_LOGS_KEPT, prune_worker_logs

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    dead = [2_000_000_000 + i for i in range(WORKER_LOGS_KEPT + 5)]  # pids beyond any pid_max
    now = _time.time()
    for age, pid in enumerate(dead):
        path = log_dir / f"worker-m-{pid}.log"
        path.write_text("{}\n")
        os.utime(path, (now - age * 60, now - age * 60))
    live = log_dir / f"worker-m-{os.getpid()}.log"
    live.write_text("{}\n")
    os.utime(live, (now - 10**6, now - 10**6))  # the oldest of all, and alive
    removed = prune_worker_logs(log_dir)
    assert sorted(removed) == sorted(f"worker-m-{pid}.log" for pid in dead[WORKER_LOGS_KEPT:])
    assert live.exists() and len(list(log_dir.glob("worker-m-*.log"))) == WORKER_LOGS_KEPT + 1
