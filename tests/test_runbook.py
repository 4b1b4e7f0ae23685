"""docs/runbook.md is executable knowledge: every command in it parses with lmxctl's own parser,
every error code has a row, and the 3 a.m. stories work by following only what the tools print."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.errors import ErrorCode
from lmxctl.cli import _parser
from tests.harness import REPO

RUNBOOK = REPO / "docs" / "runbook.md"
PLACEHOLDERS = {"MODEL": "m", "REVISION": "0123456789ab", "~/lmx.toml": "/tmp/lmx.toml"}


def _commands() -> list[str]:
    text = RUNBOOK.read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).split(">")[0].strip()
            if line.startswith("lmxctl "):
                lines.append(line)
    return lines


def test_the_runbook_has_commands_for_every_story() -> None:
    subcommands = {shlex.split(c)[1] for c in _commands()}
    assert {"status", "logs", "events", "history", "verify", "repair", "release", "rollback", "load", "reload",
            "service", "metrics", "compat", "probe", "generate"} <= subcommands


@pytest.mark.parametrize("command", _commands())
def test_every_runbook_command_parses(command: str) -> None:
    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(command)[1:]]
    _parser().parse_args(argv)  # argparse exits 2 (failing the test) on anything it does not know


def test_every_error_code_has_a_row() -> None:
    text = RUNBOOK.read_text()
    for code in ErrorCode:
        assert f"`{code.code}`" in text, f"{code.code} is not in the runbook's table"


def _ctl(sup, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _next_step_commands(output: str, model: str) -> list[list[str]]:
    (hint,) = [line for line in output.splitlines() if line.strip().startswith("next:")]
    return [shlex.split(c.strip(" .")) for c in re.findall(rf"lmxctl [a-z-]+ {model}(?: --[a-z-]+)*\b", hint)]


def test_a_broken_snapshot_is_brought_back_by_following_the_tools(make_supervisor, tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model, snap)
    (snap / "tokenizer.json").unlink()
    sup = make_supervisor([{"id": "m", "path": str(snap), "mirror": str(tiny_model)}]).start(wait_ready=False)
    sup.wait_model("m", lambda m: m["state"] == "REJECTED", 10, "REJECTED")

    status = _ctl(sup, "status")
    assert status.returncode == 0
    assert "m is REJECTED: SNAPSHOT_INCOMPLETE: tokenizer.json" in status.stdout
    steps = _next_step_commands(status.stdout, "m")
    assert steps == [["lmxctl", "verify", "m"], ["lmxctl", "repair", "m"]]
    verify = _ctl(sup, *steps[0][1:])
    assert verify.returncode == 1 and "tokenizer.json" in verify.stdout
    logs = _ctl(sup, "logs", "--model", "m", "--level", "warning")
    assert "SNAPSHOT_INCOMPLETE" in logs.stdout or "REJECTED" in logs.stdout
    repair = _ctl(sup, *steps[1][1:])
    assert repair.returncode == 0, repair.stderr
    sup.wait_model("m", lambda m: m["state"] == "READY", 30, "READY after repair")
    assert "m is " not in _ctl(sup, "status").stdout  # nothing left to explain


def test_a_quarantined_model_is_released_by_following_the_tools(make_supervisor, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    command = [sys.executable, "-m", "tests.chaos_worker", "--at", "load", "--signal", "SIGSEGV",
               "--unless-exists", str(fixed)]
    sup = make_supervisor([{"id": "m", "path": str(tiny_model), "worker_command": command}],
                          restart={"quarantine_after": 2, "backoff_initial_s": 0.05}).start(wait_ready=False)
    sup.wait_model("m", lambda m: m["state"] == "QUARANTINED", 60, "QUARANTINED")

    status = _ctl(sup, "status")
    assert "m is QUARANTINED: MODEL_QUARANTINED: 2 failures" in status.stdout
    steps = _next_step_commands(status.stdout, "m")
    assert ["lmxctl", "history", "m"] in steps and ["lmxctl", "release", "m"] in steps
    history = _ctl(sup, "history", "m")
    assert history.stdout.count("WORKER_CRASHED") == 2 and "SIGSEGV" in history.stdout
    fixed.touch()  # the operator fixes the cause
    release = _ctl(sup, "release", "m")
    assert release.returncode == 0, release.stderr
    sup.wait_model("m", lambda m: m["state"] == "READY", 30, "READY after release")
