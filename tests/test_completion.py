"""`lmxctl completion bash` completes subcommands and their flags, checked in a real bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.harness import REPO


def _complete(words: list[str]) -> list[str]:
    script = subprocess.run([sys.executable, "-m", "lmxctl", "completion", "bash"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=60).stdout
    line = " ".join(words)
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _lmxctl; "
             'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_knows_subcommands_and_flags() -> None:
    assert _complete(["lmxctl", "st"]) == ["status"]
    assert set(_complete(["lmxctl", "re"])) == {"release", "reload", "repair"}
    assert _complete(["lmxctl", "load", "--f"]) == ["--force"]
    assert "--idle-timeout" in _complete(["lmxctl", "events", "--"])
