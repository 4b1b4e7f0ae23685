"""The import rules ([tool.importlinter] in pyproject.toml): between packages, and the layers inside
supervisor/ (docs/architecture.md, "Layers"). Run by import-linter so that `make test` fails on a
violation, indirect ones and those under TYPE_CHECKING included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.timeout(90)


def _lint_imports() -> list[str]:
    # Beside this interpreter first: the venv's script, even when the venv is not on PATH.
    local = Path(sys.executable).with_name("lint-imports")
    return [str(local) if local.exists() else shutil.which("lint-imports") or "lint-imports"]


def test_import_contracts_are_kept() -> None:
    # --no-cache: a stale cache must not hide a new import, and the check writes nothing into the tree.
    out = subprocess.run([*_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_supervisor_is_layered_and_every_module_has_a_layer() -> None:
    # The contract above passes on nothing if the layers contract is dropped or loses a layer.
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["supervisor"]]
    assert len(layered) == 1 and layered[0].get("exhaustive") is True
    layers = [part.strip().strip("()") for layer in layered[0]["layers"] for part in layer.split(":")]
    for name in ("config", "logs", "topology", "persistence", "admission", "workers", "lifecycle", "operations",
                 "control", "daemon"):
        assert name in layers, name
    order = {name: i for i, name in enumerate(layers)}
    # Listed top first: the daemon above control, control above lifecycle, ... the kernel last.
    assert order["daemon"] < order["control"] < order["lifecycle"] < order["workers"] < order["admission"] \
        < order["persistence"] < order["config"]
