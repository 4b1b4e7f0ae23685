"""The files MLX reads to join a group (the ring's hostfile, jaccl's devices file): where they go
and how they are written, for the group's owner (group.py) and for a peer's placed rank (placed.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def write(state_dir: Path | None, name: str, content: Any) -> Path:
    """`content` (JSON, or a string as it is) as groups/`name` under the state dir (the system's
    temp dir without one: a throwaway runtime); the path MLX is to be given."""
    base = (Path(state_dir) if state_dir is not None else Path(tempfile.gettempdir())) / "groups"
    base.mkdir(parents=True, exist_ok=True)
    path = base / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path

