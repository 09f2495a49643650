"""The ledger's SQLite database: schema, queries, and grouped commits.

Schema (``format`` 1)::

    meta(name PRIMARY KEY, value)           format, function, keys ("index" or "key")
    tasks(key PRIMARY KEY,                  a str or an int: no column type, so 1 != '1'
          fingerprint, state,               'started', 'done' or 'failed'
          attempts, run, started, finished, seconds,
          result,                           the pickled return value ('done')
          error, error_type, error_message, traceback)          ('failed')
    runs(id PRIMARY KEY, pid, started, ended, outcome, total)

One row per key, ever: a task is inserted as ``started`` (committed before it is handed to
the pool), and its outcome is written into the same row.  ``runs`` holds one row per run;
``ended`` stays NULL when the run died.

The database is in WAL mode with ``synchronous=NORMAL`` (``durable=True``: ``FULL``):
a commit survives the death of the process at once, and a power loss may lose the last
few commits (the tasks they recorded then run again).  The file is created 0600 (SQLite
gives ``-wal`` and ``-shm`` the database's mode).

Only the parent writes; children never open the database.  They inherit its descriptors
across ``fork``, though, and a child forked while this process is inside SQLite would
inherit SQLite's mutexes held, and deadlock if its task opens a database of its own: every
SQLite call here holds :data:`FORK_GUARD`, which ``os.fork`` takes around each fork.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidArgumentError, ObjectNotFoundError
from ..pool.forksafety import EXEMPT_FILES
from .keys import TaskKey
from .runlock import check_folder

__all__ = ["DONE", "FAILED", "FORK_GUARD", "FORMAT", "STARTED", "Store", "Writes"]

FORMAT = "ipcfork-ledger 1"
STARTED, DONE, FAILED = "started", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS tasks (
    key PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('started', 'done', 'failed')),
    attempts INTEGER NOT NULL,
    run INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    seconds REAL,
    result BLOB,
    error BLOB,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    total INTEGER
);
"""

# -- fork guard ---------------------------------------------------------------------------

FORK_GUARD = threading.Lock()
_FORK_WAIT = 1.0  # seconds a fork waits for a SQLite call (a few microseconds) to end
_held_for_fork = [False]


def _before_fork() -> None:
    # Bounded: a signal handler that runs in the middle of a guarded block (between two
    # bytecodes, never inside SQLite) and waits for the pool's manager must not deadlock.
    _held_for_fork[0] = FORK_GUARD.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    if _held_for_fork[0]:
        _held_for_fork[0] = False
        FORK_GUARD.release()


def _after_fork_in_child() -> None:
    global FORK_GUARD
    _held_for_fork[0] = False
    FORK_GUARD = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any exception),
    under the fork guard."""
    with FORK_GUARD:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# -- the database -------------------------------------------------------------------------


class Store:
    """An open ledger database (see the module docstring).

    ``create``: make the database if ``path`` does not exist (else ObjectNotFoundError).
    Raises InvalidArgumentError if ``path`` holds something other than a ledger (another
    SQLite database, any other file), ObjectNotFoundError if its directory does not exist.
    """

    def __init__(self, path: str, *, durable: bool = False, create: bool = True) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None
        check_folder(path)
        fresh = False
        if create:
            try:  # 0600 whatever the umask: results may be private
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                pass
            else:
                os.fchmod(fd, 0o600)
                os.close(fd)
                fresh = True
        if not os.path.exists(path):
            raise ObjectNotFoundError(f"no ledger at {path}", obj=f"ledger {path!r}")
        if os.path.isdir(path):
            raise InvalidArgumentError(f"ledger {path} is a directory, not a file")
        fresh = fresh or os.path.getsize(path) == 0
        with FORK_GUARD:
            # isolation_level=None: we issue BEGIN and COMMIT ourselves (grouped commits).
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._check_format(fresh)
            synchronous = "FULL" if durable else "NORMAL"
            with FORK_GUARD:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute(f"PRAGMA synchronous={synchronous}")
                self.conn.execute("PRAGMA busy_timeout=5000")
                if fresh:
                    self.conn.executescript(_SCHEMA)
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)",
                                      (FORMAT,))
        except BaseException:
            self.close()
            raise
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)
        EXEMPT_FILES.add(self._identity)  # children inherit it, and never touch it

    def _check_format(self, fresh: bool) -> None:
        if fresh:
            return
        try:
            with FORK_GUARD:
                tables = {row[0] for row in self.conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
                found = None
                if "meta" in tables:
                    row = self.conn.execute(
                        "SELECT value FROM meta WHERE name = 'format'").fetchone()
                    found = row[0] if row else None
        except sqlite3.DatabaseError as exc:
            raise InvalidArgumentError(f"{self.path} is not an ipcfork ledger ({exc})"
                                       ) from None
        if found != FORMAT:
            what = f"format {found!r}" if found else "an SQLite database of another program"
            raise InvalidArgumentError(f"{self.path} is not an ipcfork ledger ({what}); "
                                       "give the batch a path of its own")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._identity is not None:
            EXEMPT_FILES.discard(self._identity)
            self._identity = None
        conn = getattr(self, "conn", None)
        if conn is not None:
            with FORK_GUARD:
                conn.close()
            del self.conn

    # -- reads ----------------------------------------------------------------------------

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one SELECT."""
        with FORK_GUARD:
            return self.conn.execute(sql, args).fetchall()

    def meta(self) -> dict[str, Any]:
        return dict(self.query("SELECT name, value FROM meta"))

    def states(self) -> dict[TaskKey, tuple[str, bytes]]:
        """Every recorded key's state and fingerprint."""
        return {key: (state, fp) for key, state, fp in
                self.query("SELECT key, state, fingerprint FROM tasks")}

    def outcome(self, key: TaskKey) -> tuple[Any, ...] | None:
        """``(state, result, error, error_type, error_message, traceback)`` of ``key``."""
        rows = self.query("SELECT state, result, error, error_type, error_message, "
                          "traceback FROM tasks WHERE key = ?", (key,))
        return tuple(rows[0]) if rows else None

    # -- writes outside batches -----------------------------------------------------------

    def execute(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run ``statements`` in one transaction."""
        with _transaction(self.conn):
            for sql, args in statements:
                self.conn.execute(sql, args)

    def begin_run(self, total: int | None) -> int:
        with FORK_GUARD:
            cursor = self.conn.execute(
                "INSERT INTO runs (pid, started, total) VALUES (?, ?, ?)",
                (os.getpid(), time.time(), total))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def set_meta(self, name: str, value: Any) -> None:
        self.execute(("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value)))


class Writes:
    """Rows waiting for the next grouped commit: ``started`` rows (which must be committed
    before their tasks go to the pool), outcomes (before they are yielded), and reverts of
    tasks cancelled before they ran."""

    def __init__(self, run: int) -> None:
        self.run = run
        self.started: dict[TaskKey, tuple[TaskKey, bytes, int, float]] = {}
        self.outcomes: list[tuple[Any, ...]] = []
        self.reverts: list[tuple[TaskKey, str | None]] = []
        self.since: float | None = None  # monotonic time of the oldest uncommitted row

    def __len__(self) -> int:
        return len(self.started) + len(self.outcomes) + len(self.reverts)

    def _touch(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def start(self, key: TaskKey, fingerprint: bytes) -> None:
        self._touch()
        self.started[key] = (key, fingerprint, self.run, time.time())

    def done(self, key: TaskKey, seconds: float | None, result: bytes) -> None:
        self._touch()
        self.outcomes.append((DONE, time.time(), seconds, result, None, None, None, None, key))

    def failed(self, key: TaskKey, seconds: float | None, error: bytes | None,
               error_type: str, message: str, traceback: str | None) -> None:
        self._touch()
        self.outcomes.append((FAILED, time.time(), seconds, None, error, error_type, message,
                              traceback, key))

    def revert(self, key: TaskKey, prior: str | None) -> None:
        """The task never ran: back to its state before this run (None: no row)."""
        if self.started.pop(key, None) is None:  # committed already: undo in the database
            self._touch()
            self.reverts.append((key, prior))

    def flush(self, store: Store) -> None:
        """Commit every waiting row in one transaction (nothing to do when none wait)."""
        if not len(self):
            return
        deleted = [(key,) for key, prior in self.reverts if prior is None]
        restored = [(prior, key) for key, prior in self.reverts if prior is not None]
        conn = store.conn
        with _transaction(conn):
            if self.started:
                conn.executemany(
                    "INSERT INTO tasks (key, fingerprint, state, attempts, run, started) "
                    "VALUES (?, ?, 'started', 1, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "state = 'started', attempts = attempts + 1, run = excluded.run, "
                    "started = excluded.started, finished = NULL, seconds = NULL",
                    self.started.values())
            if self.outcomes:
                conn.executemany(
                    "UPDATE tasks SET state = ?, finished = ?, seconds = ?, result = ?, "
                    "error = ?, error_type = ?, error_message = ?, traceback = ? "
                    "WHERE key = ?", self.outcomes)
            if deleted:
                conn.executemany("DELETE FROM tasks WHERE key = ?", deleted)
            if restored:
                conn.executemany("UPDATE tasks SET state = ?, attempts = attempts - 1 "
                                 "WHERE key = ?", restored)
        self.started.clear()
        self.outcomes.clear()
        self.reverts.clear()
        self.since = None
