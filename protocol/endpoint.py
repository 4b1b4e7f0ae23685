"""Where the supervisor lives: the state dir and the control-socket endpoint derived from it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONTROL_SOCKET = "control.sock"
WORKER_SOCKET = "workers.sock"
EVENTS_SOCKET = "events.sock"  # PUB: lifecycle events, one [name, msgpack fields] message each


def default_state_dir() -> Path:
    """LMX_STATE_DIR, else the platform default of BRIEF §5."""
    env = os.environ.get("LMX_STATE_DIR")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "lmx-supervisor"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else home / ".local" / "state"
    return base / "lmx-supervisor"


def resolve_state_dir(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir).expanduser() if state_dir else default_state_dir()


def control_endpoint(state_dir: str | os.PathLike | None = None) -> str:
    return f"ipc://{resolve_state_dir(state_dir) / CONTROL_SOCKET}"


def worker_endpoint(state_dir: Path) -> str:
    return f"ipc://{state_dir / WORKER_SOCKET}"


def worker_identities(token: str) -> tuple[bytes, bytes]:
    """A worker's two identities on the worker socket, both derived from its secret token: its IO
    thread's (hello and heartbeats out; init, shutdown and adopt in) and its main thread's (ready,
    chunks, finals, errors out, straight from the thread that makes them; generate requests and
    cancels in, when its hello says `direct_requests`): no hop through the IO thread and no wait
    for the GIL either way."""
    return token.encode(), token.encode() + b"/data"


def events_endpoint(state_dir: str | os.PathLike | None = None) -> str:
    return f"ipc://{resolve_state_dir(state_dir) / EVENTS_SOCKET}"
