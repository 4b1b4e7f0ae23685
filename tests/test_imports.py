"""The import rules between packages ([tool.importlinter] in pyproject.toml), run by import-linter
so that `make test` fails on a violation, indirect ones included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO


def _lint_imports() -> list[str]:
    # Beside this interpreter first: the venv's script, even when the venv is not on PATH.
    local = Path(sys.executable).with_name("lint-imports")
    return [str(local) if local.exists() else shutil.which("lint-imports") or "lint-imports"]


def test_import_contracts_are_kept() -> None:
    # --no-cache: a stale cache must not hide a new import, and the check writes nothing into the tree.
    out = subprocess.run([*_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
