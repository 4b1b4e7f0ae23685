"""How the store meets the disk: opening it (a lock is waited for, and only SQLite's own verdict
makes a store corrupt), its schema version and migrations, retention of history, and writes that
never hold the event loop: a write that fails waits in order with every later one and is retried,
while the store reports itself degraded."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

# Primary result codes (https://www.sqlite.org/rescode.html); extended codes keep these in the low byte.
_BUSY, _LOCKED, _READONLY, _FULL, _CANTOPEN, _CORRUPT, _NOTADB = 5, 6, 8, 13, 14, 11, 26
_REASONS = {_BUSY: "locked", _LOCKED: "locked", _READONLY: "read-only", _FULL: "disk full",
            _CANTOPEN: "cannot be opened", 10: "I/O error", 3: "permission denied"}
# While serving, a write waits at most this long for a lock: the event loop (every client) waits
# with it. Anything longer is retried in the background.
RUNTIME_BUSY_S = 0.02
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 2.0
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

Write = Callable[[Any], Any]  # one logical write: gets the connection, runs its statements


def synced(fn: Write) -> Write:
    """A write that decides safety (a failure, a quarantine): committed with the WAL fsynced, so
    that what clients are told next survives a power loss too, not only our own death."""
    fn.synced = True  # type: ignore[attr-defined]
    return fn


class StoreUnavailable(Exception):
    """The store exists but cannot be used now (locked past the bound, read-only, full, or of a newer
    schema): the supervisor refuses to start rather than start from an empty one."""

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"store {path} is {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def code_of(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_corrupt(exc: sqlite3.Error) -> bool:
    return code_of(exc) in (_CORRUPT, _NOTADB)


def is_busy(exc: sqlite3.Error) -> bool:
    return code_of(exc) in (_BUSY, _LOCKED)


def is_transient(exc: BaseException) -> bool:
    """A failure of the disk or of a lock, which a later try can get past; not a bug of ours (a
    constraint or a misuse), which no retry fixes."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def reason_of(exc: sqlite3.Error) -> str:
    return _REASONS.get(code_of(exc) or -1, "unusable")


# --- schema ---------------------------------------------------------------------------------------

# Each entry takes the store from version i to i + 1 (PRAGMA user_version). Only ever append.
# Version 1 is the schema from before versioning: CREATE ... IF NOT EXISTS, so an unversioned store
# of an older release is taken to version 1 without change.
MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS failures(
  id INTEGER PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL, at REAL NOT NULL,
  code TEXT NOT NULL, counted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS crashes(
  id INTEGER PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL, at REAL NOT NULL,
  code TEXT NOT NULL, cause TEXT, victim INTEGER NOT NULL, signal TEXT, exit_code INTEGER,
  phase TEXT, request_id TEXT, worker_pid INTEGER, memory TEXT, stderr_tail TEXT);
CREATE TABLE IF NOT EXISTS models(
  model TEXT PRIMARY KEY, quarantined INTEGER NOT NULL DEFAULT 0, quarantine TEXT,
  lkg_revision TEXT, running_revision TEXT, configured_revision TEXT, wanted INTEGER);
CREATE TABLE IF NOT EXISTS revisions(
  model TEXT NOT NULL, revision TEXT NOT NULL, section TEXT NOT NULL, first_seen REAL NOT NULL,
  PRIMARY KEY(model, revision));
CREATE TABLE IF NOT EXISTS workers(
  model TEXT PRIMARY KEY, pid INTEGER NOT NULL, start_time REAL NOT NULL, token TEXT NOT NULL,
  revision TEXT NOT NULL, socket TEXT NOT NULL, boot_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS compat(
  fingerprint TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL,
  evidence TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  PRIMARY KEY(fingerprint, backend));
CREATE TABLE IF NOT EXISTS canary_outputs(
  fingerprint TEXT NOT NULL, backend TEXT NOT NULL, template TEXT NOT NULL, prompt TEXT NOT NULL,
  output_sha256 TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY(fingerprint, backend, template, prompt));
CREATE TABLE IF NOT EXISTS file_hashes(
  path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
  sha256 TEXT NOT NULL, PRIMARY KEY(path));
CREATE TABLE IF NOT EXISTS manifests(snapshot TEXT PRIMARY KEY, files TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS boots(id INTEGER PRIMARY KEY, at REAL NOT NULL, clean INTEGER NOT NULL DEFAULT 0)
""",
    # 2: swaps outlive the supervisor; history is pruned by model and age, so index it that way.
    """
CREATE TABLE aliases(old TEXT PRIMARY KEY, new TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX crashes_model_at ON crashes(model, at);
CREATE INDEX failures_model_at ON failures(model, at);
CREATE INDEX boots_at ON boots(at)
""",
    # 3: a group's failure names the rank that failed and the host it ran on.
    """
ALTER TABLE crashes ADD COLUMN rank INTEGER;
ALTER TABLE crashes ADD COLUMN host TEXT
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION, each step in its own transaction; (from, to). Also proves
    that we can write: BEGIN IMMEDIATE takes the write lock even when there is nothing to do."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreUnavailable(path, f"of schema version {found}",
                                   f"written by a newer lmx-supervisor (this one knows up to {SCHEMA_VERSION}); "
                                   "upgrade, or move the store aside to start afresh")
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={version + 1}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found, SCHEMA_VERSION


# --- opening --------------------------------------------------------------------------------------

def connect(path: Path, busy_s: float) -> tuple[sqlite3.Connection, tuple[int, int]]:
    """Connect, check with SQLite's own quick_check, migrate; the connection and (from, to)
    schema versions. Raises sqlite3 errors as they are."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_s)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        verdict = db.execute("PRAGMA quick_check").fetchall()
        if verdict != [("ok",)]:
            err = sqlite3.DatabaseError("quick_check: " + "; ".join(str(r[0]) for r in verdict[:5]))
            err.sqlite_errorcode = _CORRUPT  # type: ignore[attr-defined]
            raise err
        migrated = migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db, migrated


def open_waiting(path: Path, lock_wait_s: float, log: Any) -> tuple[sqlite3.Connection, tuple[int, int], float]:
    """Open the store, waiting up to `lock_wait_s` while another process holds it locked; returns
    the connection, the schema versions (from, to) and how long we waited. Corruption (SQLite says
    so) raises sqlite3.DatabaseError; anything else that stops us raises StoreUnavailable."""
    start = time.monotonic()
    deadline = start + lock_wait_s
    busy_s = min(0.1, lock_wait_s)  # the first try is short, so that a wait is logged as it begins
    logged = False
    while True:
        try:
            db, migrated = connect(path, busy_s)
            if logged:
                log.info("store.lock_waited", path=str(path), waited_s=round(time.monotonic() - start, 3))
            return db, migrated, time.monotonic() - start
        except sqlite3.Error as exc:
            if is_corrupt(exc):
                raise
            waited = time.monotonic() - start
            if not is_busy(exc):
                raise StoreUnavailable(path, reason_of(exc), str(exc)) from None
            if time.monotonic() >= deadline:
                raise StoreUnavailable(path, "locked", f"another process held it for {waited:.1f}s "
                                       f"(store_lock_wait_s = {lock_wait_s:g})") from None
            if not logged:
                logged = True
                log.warning("store.lock_waiting", path=str(path), error=str(exc), store_lock_wait_s=lock_wait_s)
            # SQLite's busy handler waits on the lock itself, up to the time left.
            busy_s = max(0.01, deadline - time.monotonic())


# --- writes ---------------------------------------------------------------------------------------

class TimedConnection:
    """The sqlite3 connection, with every write statement's latency reported to `on_write`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.on_write: Callable[[float], None] | None = None

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.on_write is None or not sql.lstrip().upper().startswith(_WRITES):
            return self._db.execute(sql, params)
        start = time.perf_counter()
        try:
            return self._db.execute(sql, params)
        finally:
            self.on_write(time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class Writes:
    """Every write of the store, in order. One that fails (locked, full, read-only) stays queued with
    everything after it and is retried with backoff on the event loop; meanwhile `degraded` is true
    and the store's readers see the queued writes from its caches."""

    def __init__(self, db: TimedConnection, log: Any, on_flushed: Callable[[], None]) -> None:
        self.db = db
        self.log = log
        self._on_flushed = on_flushed
        self.pending: collections.deque[Write] = collections.deque()
        self.degraded_since: float | None = None  # monotonic
        self.last_error: str | None = None
        self._delay = RETRY_INITIAL_S
        self._timer: asyncio.TimerHandle | None = None
        # Checksums are verified in a thread that caches hashes through the store: one transaction
        # at a time on the shared connection, and retries scheduled on the loop that owns it.
        self._mutex = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def degraded(self) -> bool:
        return bool(self.pending)

    def write(self, fn: Write) -> None:
        with self._mutex:
            self.pending.append(fn)
            if self._timer is None:  # else a retry is scheduled and will take this one in its turn
                self.flush(inline=len(self.pending) == 1)

    def now(self, fn: Write) -> Any:
        """A write whose result the caller needs at once (a boot's id): never queued."""
        with self._mutex:
            if self.pending:
                self.flush(inline=False)
            return self._transaction(fn)

    def _transaction(self, fn: Write) -> Any:
        synced = getattr(fn, "synced", False)
        if synced:  # its commit is on the disk when COMMIT returns (WAL fsynced), not only in the OS
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self.db)
            self.db.execute("COMMIT")
            return result
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the transaction is gone already; the error that matters is the one raised
            raise
        finally:
            if synced:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def flush(self, inline: bool = False) -> bool:
        """Write what is queued, oldest first; True when nothing is left. `inline`: the caller's own
        write is the only one, so a bug in it (not the disk) is raised to the caller."""
        with self._mutex:
            return self._flush(inline)

    def _flush(self, inline: bool) -> bool:
        while self.pending:
            try:
                self._transaction(self.pending[0])
            except Exception as exc:
                if not is_transient(exc):
                    self.pending.popleft()  # a bug of ours: retrying cannot fix it
                    if inline:
                        raise
                    self.log.exception("internal.store_write_failed")
                    continue
                self._degrade(exc)
                return False
            self.pending.popleft()
        self._recovered()
        return True

    def _degrade(self, exc: Exception) -> None:
        self.last_error = f"{reason_of(exc)}: {exc}"  # type: ignore[arg-type]
        if self.degraded_since is None:
            self.degraded_since = time.monotonic()
            self.log.error("store.degraded", error=self.last_error, pending_writes=len(self.pending),
                           hint="safety state is kept in memory and retried; check the disk and who "
                                "holds the store open (fuser store.sqlite3)")
        try:
            self._loop = asyncio.get_running_loop()
            self._schedule()
        except RuntimeError:  # a thread of ours, or no loop at all (a tool, a test)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        with self._mutex:
            if self._timer is not None or not self.pending:
                return  # a retry is already on its way, or nothing is left to retry
            assert self._loop is not None
            self._timer = self._loop.call_later(self._delay, self._retry)
            self._delay = min(RETRY_MAX_S, self._delay * 2)

    def _retry(self) -> None:
        with self._mutex:
            self._timer = None
            self.flush()

    def _recovered(self) -> None:
        self._on_flushed()
        if self.degraded_since is not None:
            self.log.info("store.recovered", degraded_s=round(time.monotonic() - self.degraded_since, 3))
        self.degraded_since, self.last_error, self._delay = None, None, RETRY_INITIAL_S

    def drain(self, wait_s: float) -> int:
        """At shutdown: keep trying up to `wait_s` (SQLite waits on the lock); returns what is left."""
        with self._mutex:
            return self._drain(wait_s)

    def _drain(self, wait_s: float) -> int:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pending:
            self.db.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
            self.flush()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        return len(self.pending)
