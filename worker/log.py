"""Worker log lines: one JSON object per line on stderr, relayed by the supervisor with the model id."""

from __future__ import annotations

import json
import os
import sys
import time

# The supervisor names a per-worker file too: a worker that outlives its supervisor and is adopted
# by the next one has lost its stderr pipe, but its log stays readable there.
_FILE = None
if os.environ.get("LMX_WORKER_LOG_DIR"):
    try:
        _FILE = open(os.path.join(os.environ["LMX_WORKER_LOG_DIR"],
                                  f"worker-{os.environ.get('LMX_MODEL_ID', 'model')}-{os.getpid()}.log"),
                     "a", buffering=1)
    except OSError:
        _FILE = None


def assign(model_id: str) -> None:
    """A warm spare that was given a model: its log file takes the model's name."""
    global _FILE
    if _FILE is None:
        return
    new = os.path.join(os.path.dirname(_FILE.name), f"worker-{model_id}-{os.getpid()}.log")
    try:
        os.replace(_FILE.name, new)
        _FILE.close()
        _FILE = open(new, "a", buffering=1)
    except OSError:
        pass


def log(event: str, level: str = "info", **fields: object) -> None:
    text = json.dumps({"ts": time.time(), "level": level, "event": event, **fields}, default=str) + "\n"
    if _FILE is not None:
        try:
            _FILE.write(text)
        except (OSError, ValueError):
            pass
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        # stderr is a pipe to the supervisor; once it is gone (orphaned) a log line must not
        # take the IO thread down with a BrokenPipeError.
        pass
