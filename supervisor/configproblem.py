"""`Problem`: a config problem at a key, raised by the parsers of the config's parts ([[peers]] and
groups, [[clients]] and listen) that do not know the file's name; config.parse turns it into a
ConfigError. A leaf, so that those parsers sit beside config instead of above it."""

from __future__ import annotations


class Problem(Exception):
    """A config problem at `key` (turned into a ConfigError by the config loader)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem
