"""The state dir: created 0700 and proven ours, then locked, before anything in it is touched."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from protocol import endpoint as ep

LOCK_FILE = "supervisor.lock"


class StateDirError(Exception):
    pass


def prepare_state_dir(state_dir: Path) -> int:
    """Create the 0700 state dir and take its lock; returns the lock fd (held for our lifetime).
    Nothing in it is touched before it proves ours and closed to others, and then the lock comes
    before anything else: two supervisors on one dir is impossible."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = state_dir.stat()
    if st.st_uid != os.getuid():
        raise StateDirError(f"state dir {state_dir} is owned by uid {st.st_uid}, not by us (uid {os.getuid()}): "
                            "use a state dir of our own (--state-dir or LMX_STATE_DIR)")
    if st.st_mode & 0o022:
        # Someone else could have planted a socket, a lock or a store there: refuse, never repair.
        raise StateDirError(f"state dir {state_dir} is writable by group or others (mode "
                            f"{st.st_mode & 0o777:04o}); check what is in it, then chmod 700 {state_dir}")
    if st.st_mode & 0o077:
        os.chmod(state_dir, 0o700)  # readable by others, but nobody else could write: just close it
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirError(f"another supervisor holds {state_dir / LOCK_FILE}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    # Sockets left by a supervisor that died: we hold the lock, so nobody is listening on them.
    for name in (ep.CONTROL_SOCKET, ep.WORKER_SOCKET, ep.EVENTS_SOCKET):
        try:
            (state_dir / name).unlink()
        except FileNotFoundError:
            pass
    return fd
