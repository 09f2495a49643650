"""``ipcfork.Ledger``: a batch's ledger as an object, to pass as ``ledger=``, to read, and
to reconcile the tasks a held run reported (``settle``, ``forget``)."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import InvalidArgumentError
from .child import failure, recorded_outcome
from .keys import TaskKey
from .runlock import RunLock, holder
from .store import DONE, FAILED, STARTED, Store
from .summary import Summary, summarise

__all__ = ["Ledger"]

_NOTHING: Any = object()


class Ledger:
    """The ledger of a resumable batch: an SQLite database at ``path``.

    Pass it (or just its path) as ``ledger=`` to ``ForkPool.map``/``imap_unordered``;
    ``durable=True`` commits with ``synchronous=FULL`` (see docs/ledger.md: durability).
    Making the object touches nothing; each method opens the database for its call.
    Methods that read raise ObjectNotFoundError when no ledger exists at ``path`` and
    InvalidArgumentError when the file is not a ledger; methods that write also raise
    LedgerBusyError while a run (or another reconciliation) is live on it.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False) -> None:
        text = os.fspath(path)
        if not isinstance(text, str) or not text:
            raise InvalidArgumentError(f"a ledger's path must be a non-empty str, not "
                                       f"{path!r}")
        self.path = text
        self.durable = bool(durable)

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"

    @contextmanager
    def _open(self, *, write: bool) -> Iterator[Store]:
        lock = RunLock(self.path, "holds") if write else None
        try:
            store = Store(self.path, durable=self.durable, create=False)
            try:
                yield store
            finally:
                store.close()
        finally:
            if lock is not None:
                lock.release()

    def summary(self) -> Summary:
        """Counts by state (done, failed, uncertain, running, pending), failures by
        exception type, and throughput; see ``ipcfork.ledger.summary``."""
        with self._open(write=False) as store:
            return summarise(store)

    def uncertain(self) -> list[TaskKey]:
        """Keys of the tasks started by a run that died before recording their outcome
        (what ``uncertain="hold"`` holds); empty while a run is live, whose started
        tasks are running, not uncertain."""
        with self._open(write=False) as store:
            if holder(self.path) is not None:
                return []
            return [row[0] for row in store.query(
                "SELECT key FROM tasks WHERE state = ? ORDER BY started, key", (STARTED,))]

    def failures(self) -> dict[TaskKey, str]:
        """``{key: "ExceptionType: message"}`` for each failed task."""
        with self._open(write=False) as store:
            return {key: f"{kind}: {message}" for key, kind, message in store.query(
                "SELECT key, error_type, error_message FROM tasks WHERE state = ? "
                "ORDER BY finished", (FAILED,))}

    def result(self, key: TaskKey) -> Any:
        """The recorded result of the task ``key``.  Raises the task's exception if it
        failed, and InvalidArgumentError if it has no outcome (never run, or uncertain)."""
        with self._open(write=False) as store:
            row = store.outcome(key)
        if row is None or row[0] == STARTED:
            raise InvalidArgumentError(f"ledger {self.path}: task {key!r} has no outcome")
        done, value = recorded_outcome(key, row)
        if done:
            return value
        raise value

    def settle(self, key: TaskKey, result: Any = _NOTHING, *,
               error: BaseException | None = None) -> None:
        """Record the outcome of an uncertain (or failed) task after checking what really
        happened: ``result`` if it was done (the next run yields it and does not run the
        task), or ``error`` if it failed (the next run retries it unless
        ``retry_failed=False``).

        Raises InvalidArgumentError if the key is unknown, if the task is done already
        (every task is recorded once), if not exactly one of ``result`` and ``error`` is
        given, or if ``result`` does not pickle; LedgerBusyError while a run is live.
        """
        if (result is _NOTHING) == (error is None):
            raise InvalidArgumentError("settle() needs exactly one of result and error=")
        if error is not None and not isinstance(error, BaseException):
            raise InvalidArgumentError(f"error must be an exception, not {error!r}")
        if error is None:
            try:
                blob = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise InvalidArgumentError(f"the result for {key!r} cannot be pickled: "
                                           f"{exc}") from exc
        with self._open(write=True) as store:
            row = store.outcome(key)
            if row is None:
                raise InvalidArgumentError(f"ledger {self.path} has no task {key!r}")
            if row[0] == DONE:
                raise InvalidArgumentError(f"ledger {self.path}: task {key!r} is done "
                                           "already; forget() it to run it again")
            if error is None:
                store.execute(("UPDATE tasks SET state = ?, finished = ?, result = ?, "
                               "error = NULL, error_type = NULL, error_message = NULL, "
                               "traceback = NULL WHERE key = ?",
                               (DONE, time.time(), blob, key)))
            else:
                _, stored, kind, message, _, _ = failure(error, None, None)
                store.execute(("UPDATE tasks SET state = ?, finished = ?, result = NULL, "
                               "error = ?, error_type = ?, error_message = ?, "
                               "traceback = NULL WHERE key = ?",
                               (FAILED, time.time(), stored, kind, message, key)))

    def forget(self, key: TaskKey) -> None:
        """Drop the task ``key`` from the ledger: the next run runs it as a new task.

        Raises InvalidArgumentError if the key is unknown; LedgerBusyError while a run is
        live.
        """
        with self._open(write=True) as store:
            if store.outcome(key) is None:
                raise InvalidArgumentError(f"ledger {self.path} has no task {key!r}")
            store.execute(("DELETE FROM tasks WHERE key = ?", (key,)))
