"""Worker log lines: one JSON object per line on stderr, relayed by the supervisor with the model id."""

from __future__ import annotations

import json
import sys
import time


def log(event: str, level: str = "info", **fields: object) -> None:
    line = {"ts": time.time(), "level": level, "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(line, default=str) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        # stderr is a pipe to the supervisor; once it is gone (orphaned) a log line must not
        # take the IO thread down with a BrokenPipeError.
        pass
