"""Session fixtures: real snapshots written once (tiny llama, SmolLM2 from its GGUF) and a factory
for real supervisor processes in per-test state dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import RunningSupervisor
from tests.snapshots import smollm2_gguf_path, write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.gguf import import_gguf  # imports mlx: in the test process, never the supervisor

    dest = tmp_path_factory.mktemp("models") / "smollm2"
    import_gguf(smollm2_gguf_path(), dest)
    return dest


@pytest.fixture
def make_supervisor(tmp_path: Path):
    """Start real `lmx-supervisor run` processes; every one is stopped (and checked) at teardown."""
    started: list[RunningSupervisor] = []

    def make(models: list[dict], **sections: dict) -> RunningSupervisor:
        sup = RunningSupervisor(tmp_path / f"sup{len(started)}", models, **sections)
        started.append(sup)
        return sup

    yield make
    for sup in started:
        sup.cleanup()
