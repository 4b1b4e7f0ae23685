"""Stored Responses (`store: true`, the default as OpenAI's): each response's input items and its
response object, in the gateway's own SQLite file (`<state_dir>/gateway/responses.sqlite`, mode
0600 in a 0700 dir), so `previous_response_id` continues a conversation across gateway restarts.

Bounded by count and by age: every write drops what is older than `max_age_s` and the oldest past
`max_count`; a read never returns an expired row even before the next write prunes it. A response
keeps only its own input and output; a chain is read back by following `previous_id` in one
recursive query, so a long conversation costs linear space, not quadratic. Each row has an owner
(the API key that made it, None without keys): another key's response is not there for a caller.

Writes run in a worker thread, one at a time on their connection. Reads are a few indexed rows
(well under a millisecond) and run on the event loop's thread on a connection of their own: under
WAL a reader never waits for a writer, and a request's parse can read its history synchronously."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from protocol import limits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT,
    created_at REAL NOT NULL,
    previous_id TEXT,
    input_items TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
"""

# The chain of `id` back to its first response, oldest first. A missing ancestor (pruned, deleted)
# ends the walk early: the caller compares the first row's previous_id with NULL.
_CHAIN = """
WITH RECURSIVE chain(id, previous_id, input_items, response, depth) AS (
    SELECT id, previous_id, input_items, response, 0 FROM responses
    WHERE id = ? AND owner IS ? AND created_at >= ?
    UNION ALL
    SELECT r.id, r.previous_id, r.input_items, r.response, c.depth + 1
    FROM responses r JOIN chain c ON r.id = c.previous_id
    WHERE r.owner IS ? AND r.created_at >= ? AND c.depth < ?
)
SELECT previous_id, input_items, response FROM chain ORDER BY depth DESC
"""


class ChainBroken(LookupError):
    """An ancestor of the response named is gone (pruned by age or count, or deleted)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ResponseStore:
    def __init__(self, path: Path, max_count: int, max_age_s: float) -> None:
        self.path = path
        self.max_count = max_count
        self.max_age_s = max_age_s
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it; its -wal and -shm files take the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            with self._lock:
                self._open()  # the file, its mode and its schema
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        return self._reader

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._open(), *args)
        return await asyncio.to_thread(locked)

    def _oldest_kept(self) -> float:
        return time.time() - self.max_age_s

    # --- writes -----------------------------------------------------------------------------------

    async def put(self, response: dict, input_items: list[dict], owner: str | None) -> None:
        await self._run(self._put, response, input_items, owner)

    def _put(self, db: sqlite3.Connection, response: dict, input_items: list[dict], owner: str | None) -> None:
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (response["id"], owner, time.time(), response.get("previous_response_id"),
                        _dumps(input_items), _dumps(response)))
            db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest_kept(),))
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created_at DESC "
                       "LIMIT -1 OFFSET ?)", (self.max_count,))

    async def delete(self, response_id: str, owner: str | None) -> bool:
        return await self._run(self._delete, response_id, owner)

    def _delete(self, db: sqlite3.Connection, response_id: str, owner: str | None) -> bool:
        with db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)).rowcount > 0

    # --- reads ------------------------------------------------------------------------------------

    def get(self, response_id: str, owner: str | None) -> tuple[dict, list[dict]] | None:
        """(response object, its input items), or None."""
        row = self._read().execute(
            "SELECT response, input_items FROM responses WHERE id = ? AND owner IS ? AND created_at >= ?",
            (response_id, owner, self._oldest_kept())).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def conversation(self, response_id: str, owner: str | None) -> list[dict] | None:
        """Every item of the conversation up to and including `response_id`'s output, oldest first
        (each response's input items, then its output items); None when it is not stored."""
        oldest = self._oldest_kept()
        rows = self._read().execute(_CHAIN, (response_id, owner, oldest, owner, oldest, limits.MAX_MESSAGES)).fetchall()
        if not rows:
            return None
        if rows[0][0] is not None:
            raise ChainBroken(rows[0][0])
        items: list[dict] = []
        for _, input_items, response in rows:
            items += json.loads(input_items)
            items += json.loads(response).get("output") or []
        return items

    def count(self) -> int:
        return self._read().execute("SELECT count(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            for db in (self._db, self._reader):
                if db is not None:
                    db.close()
            self._db = self._reader = None
