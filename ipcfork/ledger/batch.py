"""A resumable batch: ``ForkPool.map`` and ``imap_unordered`` with ``ledger=``.

One loop (:class:`_Engine`) in the caller's thread reads the input lazily, decides for
each item from the ledger what to do (yield its recorded outcome, hold it, or run it),
hands tasks to the pool, and records outcomes.  It emits one event per input item,
``(position, key, kind, value)``, in completion order; :func:`_unordered` and
:func:`_ordered` turn the events into what the caller iterates.

Writes are grouped (``store.Writes``): each round of the loop gathers new ``started``
rows and the outcomes that arrived, and commits them in one transaction when the pool is
about to run short of work, when the oldest waiting row is ``COMMIT_INTERVAL`` old, or
when ``COMMIT_ROWS`` wait.  Only after that commit are the new tasks handed to the pool
and the outcomes yielded: "started" is durable before a task can run, an outcome before
the caller sees it.

When the iterator ends early (a failed item raised, ``break``, an error), outcomes
already received are committed, tasks the pool had not started are cancelled and their
rows put back as they were, and the tasks already running (which the pool runs to the
end anyway) are waited for and recorded.  After Ctrl-C or a stop of the pool, which kill
the running tasks, those keep their ``started`` rows: the next run finds them uncertain
(re-run, or held with ``uncertain="hold"``), as after a crash.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ChildCrashedError,
    InvalidArgumentError,
    LedgerMismatchError,
    RemoteTraceback,
    UncertainTasksError,
)
from ..pool.tasks import StreamTask
from .child import failure, recorded_outcome, run_items, stored_error
from .keys import TaskKey, check_callable, fingerprint_of, function_name, key_of
from .runlock import RunLock, check_folder
from .store import DONE, FAILED, STARTED, Store, Writes

__all__ = ["COMMIT_INTERVAL", "COMMIT_ROWS", "LedgerOptions", "ledger_results"]

COMMIT_INTERVAL = 0.005  # seconds an uncommitted row may wait for company
COMMIT_ROWS = 1000  # rows that are committed at once however young
_RECORDED_PER_ROUND = 64  # recorded outcomes yielded between two looks at the pool

RESULT, ERROR, HELD = "result", "error", "held"
Event = tuple[int, TaskKey, str, Any]
Entry = tuple[int, TaskKey, str | None]  # position, key, state before this run
Sink = queue.SimpleQueue[tuple[StreamTask, bool, Any]]
UNCERTAIN_CHOICES = ("rerun", "hold")


@dataclass(frozen=True)
class LedgerOptions:
    """The ledger arguments of one ``map``/``imap_unordered`` call, checked."""

    path: str
    durable: bool
    key: Callable[[Any], Any] | None
    fingerprint: Callable[[Any], Any] | None
    hold: bool
    retry_failed: bool

    @classmethod
    def check(cls, ledger: Any, key: Any, fingerprint: Any, uncertain: Any,
              retry_failed: Any) -> LedgerOptions:
        """Raises InvalidArgumentError for a bad value, ObjectNotFoundError for a ledger
        path in a directory that does not exist."""
        from .ledger import Ledger

        durable = False
        if isinstance(ledger, Ledger):
            path, durable = ledger.path, ledger.durable
        elif isinstance(ledger, (str, os.PathLike)):
            path = os.fspath(ledger)
            if not isinstance(path, str) or not path:
                raise InvalidArgumentError(f"ledger must be a non-empty path, not {ledger!r}")
        else:
            raise InvalidArgumentError(f"ledger must be a path or an ipcfork.Ledger, not "
                                       f"{type(ledger).__name__}")
        check_callable(key, "key")
        check_callable(fingerprint, "fingerprint")
        if uncertain not in UNCERTAIN_CHOICES:
            raise InvalidArgumentError(f"uncertain must be 'rerun' or 'hold', not "
                                       f"{uncertain!r}")
        if not isinstance(retry_failed, bool):
            raise InvalidArgumentError(f"retry_failed must be True or False, not "
                                       f"{retry_failed!r}")
        check_folder(path)
        return cls(path, durable, key, fingerprint, uncertain == "hold", retry_failed)


def ledger_results(start: Callable[..., StreamTask], aborted: Callable[[], bool],
                   fn: Callable[..., Any], items: Iterable[Any], options: LedgerOptions, *,
                   star: bool, chunksize: int, depth: int, in_flight: int | None,
                   total: int | None, ordered: bool) -> Iterator[Any]:
    """The results of a resumable batch, in input order (``ordered``) or as they come.

    ``start(sink, fn, *args)`` queues one task on the pool; ``aborted()`` says whether a
    signal stopped the pool.  ``chunksize`` items travel per task; at most ``in_flight``
    items (default ``depth`` tasks) run or wait in the pool at a time.  Raises (from the
    iterator) the first failed item's exception, as a plain run would; with
    ``uncertain="hold"``, UncertainTasksError after everything else (see ``_ordered``);
    LedgerMismatchError, LedgerBusyError or InvalidArgumentError (duplicate keys, not a
    ledger) when the batch cannot go on.
    """
    engine = _Engine(start, aborted, fn, options, star=star, chunksize=chunksize,
                     limit=in_flight or depth * chunksize, total=total)
    events = engine.events(items)
    return _ordered(events, options.path) if ordered else _unordered(events, options.path)


def _held_error(keys: list[TaskKey], path: str) -> UncertainTasksError:
    shown = ", ".join(repr(k) for k in keys[:10]) + (" ..." if len(keys) > 10 else "")
    return UncertainTasksError(
        f"{len(keys)} task(s) were started by a run that died before recording their "
        f"outcome and were held, not run again (uncertain='hold'): {shown}; reconcile them "
        f"with ipcfork.Ledger({path!r}).settle(key, ...) or .forget(key), then run the "
        "batch again", keys=keys, path=path)


def _unordered(events: Generator[Event, None, None], path: str) -> Iterator[Any]:
    """Results as they come; the first error raises; held keys raise at the end."""
    held: list[TaskKey] = []
    with contextlib.closing(events):
        for _, key, kind, value in events:
            if kind == RESULT:
                yield value
            elif kind == ERROR:
                raise value
            else:
                held.append(key)
    if held:
        raise _held_error(held, path)


def _ordered(events: Generator[Event, None, None], path: str) -> Iterator[Any]:
    """Results in input order; an error raises at its position, as ``map`` does.  At the
    first held position yielding stops, so that no result is ever yielded at another's
    place, but the rest of the batch still runs and is recorded; then
    UncertainTasksError names every held key."""
    waiting: dict[int, tuple[str, Any]] = {}
    following = 0
    holding = False
    held: list[tuple[int, TaskKey]] = []
    with contextlib.closing(events):
        for position, key, kind, value in events:
            if kind == HELD:
                held.append((position, key))
            if holding:
                continue
            waiting[position] = (kind, value)
            while following in waiting:
                kind, value = waiting.pop(following)
                following += 1
                if kind == RESULT:
                    yield value
                elif kind == ERROR:
                    raise value
                else:
                    holding = True
                    waiting.clear()
                    break
    if held:
        raise _held_error([key for _, key in sorted(held)], path)


class _Engine:
    """The loop of one batch (see the module docstring)."""

    def __init__(self, start: Callable[..., StreamTask], aborted: Callable[[], bool],
                 fn: Callable[..., Any], options: LedgerOptions, *, star: bool,
                 chunksize: int, limit: int, total: int | None) -> None:
        self.start, self.aborted, self.fn, self.options = start, aborted, fn, options
        self.star, self.chunksize, self.limit, self.total = star, chunksize, limit, total
        self.sink: Sink = queue.SimpleQueue()
        self.in_flight: dict[StreamTask, list[Entry]] = {}
        self.running_items = 0  # items in tasks handed to the pool
        self.staged: list[tuple[list[Entry], list[Any]]] = []  # chunks awaiting the commit
        self.staged_items = 0
        self.arrived: list[Event] = []  # outcomes awaiting the commit
        self.outcome = "stopped"

    # -- the run ----------------------------------------------------------------------------

    def events(self, items: Iterable[Any]) -> Generator[Event, None, None]:
        """Open the ledger (at the first ``next``), run the batch, close the ledger."""
        options = self.options
        lock = RunLock(options.path)
        store: Store | None = None
        writes: Writes | None = None
        try:
            store = Store(options.path, durable=options.durable)
            known = self._check_batch(store)
            writes = Writes(store.begin_run(self.total))
            yield from self._loop(iter(items), store, writes, known)
            self.outcome = "complete"
        except GeneratorExit:
            self.outcome = "stopped"
            raise
        except BaseException as exc:
            self.outcome = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            raise
        finally:
            try:
                if store is not None and writes is not None:
                    self._wind_up(store, writes)
            finally:
                if store is not None:
                    store.close()
                lock.release()

    def _check_batch(self, store: Store) -> dict[TaskKey, tuple[str, bytes]]:
        """Refuse a ledger written by another function or with another kind of key;
        record both in a new one.  Returns what the ledger knows of each key."""
        meta = store.meta()
        wanted = {"function": function_name(self.fn),
                  "keys": "index" if self.options.key is None else "key"}
        for name, value in wanted.items():
            recorded = meta.get(name)
            if recorded is None:
                store.set_meta(name, value)
            elif recorded != value:
                what = {"function": "function", "keys": "kind of key"}[name]
                raise LedgerMismatchError(
                    f"ledger {store.path} records a batch whose {what} is {recorded!r}, "
                    f"but this call's is {value!r}: give this batch a ledger of its own "
                    "(or delete the old one)", obj=f"ledger {store.path!r}")
        return store.states()

    def _loop(self, items: Iterator[Any], store: Store, writes: Writes,
              known: dict[TaskKey, tuple[str, bytes]]) -> Iterator[Event]:
        options = self.options
        seen: dict[TaskKey, int] = {}
        position = 0
        exhausted = False
        keys: list[Entry] = []
        chunk: list[Any] = []
        while True:
            recorded: list[Event] = []
            # 1. Read the input while there is room in the pool.
            while (not exhausted and self.running_items + self.staged_items < self.limit
                   and len(recorded) < _RECORDED_PER_ROUND):
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    if self.total is None:
                        self.total = position
                    break
                key = key_of(options.key, item, position)
                if key in seen:
                    raise InvalidArgumentError(
                        f"key {key!r} appears twice in the batch (items {seen[key]} and "
                        f"{position}): every task of a ledger needs a key of its own")
                seen[key] = position
                fingerprint = fingerprint_of(item, options.fingerprint)
                state = self._recorded_state(store, key, fingerprint, known)
                if state == DONE or (state == FAILED and not options.retry_failed):
                    recorded.append(self._recorded_event(store, position, key))
                elif state == STARTED and options.hold:
                    recorded.append((position, key, HELD, None))
                else:
                    writes.start(key, fingerprint)
                    keys.append((position, key, state))
                    chunk.append(item)
                    self.staged_items += 1
                    if len(chunk) == self.chunksize:
                        self.staged.append((keys, chunk))
                        keys, chunk = [], []
                position += 1
            if chunk:  # the pool has room for no more: a short chunk goes now
                self.staged.append((keys, chunk))
                keys, chunk = [], []
            # 2. Take what the pool finished (without waiting).
            self._collect(writes)
            # 3. Commit when due, then hand out the new tasks and yield the outcomes.
            if self._commit_due(writes, exhausted):
                writes.flush(store)
                self._dispatch()
                arrived, self.arrived = self.arrived, []
                yield from arrived
            yield from recorded
            if exhausted and not self.in_flight and not self.staged and not len(writes):
                if self.arrived:
                    continue
                return
            # 4. Nothing more to do now: wait for the pool (or for the commit to fall due).
            if not recorded and (self.in_flight or self.staged):
                self._wait(writes)

    def _recorded_state(self, store: Store, key: TaskKey, fingerprint: bytes,
                        known: dict[TaskKey, tuple[str, bytes]]) -> str | None:
        entry = known.pop(key, None)  # each key is looked at once: its memory goes now
        if entry is None:
            return None
        state, recorded = entry
        if recorded != fingerprint:
            raise LedgerMismatchError(
                f"ledger {store.path}: the item with key {key!r} differs from the one "
                "recorded under that key; a resumed batch must be given the same items "
                "(give a changed batch a ledger of its own, or pass key= for stable "
                "identities)", obj=f"ledger {store.path!r}")
        return state

    def _recorded_event(self, store: Store, position: int, key: TaskKey) -> Event:
        row = store.outcome(key)
        assert row is not None
        done, value = recorded_outcome(key, row)
        return (position, key, RESULT if done else ERROR, value)

    def _commit_due(self, writes: Writes, exhausted: bool) -> bool:
        if not len(writes):
            return bool(self.arrived)
        if self.staged and (self.running_items <= self.limit // 2 or not self.in_flight):
            return True  # the pool runs short of work
        if len(writes) >= COMMIT_ROWS or (exhausted and not self.staged
                                          and not self.in_flight):
            return True
        assert writes.since is not None
        return time.monotonic() - writes.since >= COMMIT_INTERVAL

    def _dispatch(self) -> None:
        while self.staged:
            entries, chunk = self.staged[0]
            task = self.start(self.sink, run_items, self.fn, [e[1] for e in entries], chunk,
                              self.star)
            self.staged.pop(0)
            self.staged_items -= len(entries)
            self.in_flight[task] = entries
            self.running_items += len(entries)

    def _wait(self, writes: Writes) -> None:
        """Block until the pool reports, or until the waiting rows are due."""
        timeout = None
        if writes.since is not None:
            timeout = max(0.0, writes.since + COMMIT_INTERVAL - time.monotonic())
        try:
            message = self.sink.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle(message, writes)

    def _collect(self, writes: Writes) -> None:
        while True:
            try:
                message = self.sink.get_nowait()
            except queue.Empty:
                return
            self._settle(message, writes)

    def _settle(self, message: tuple[StreamTask, bool, Any], writes: Writes) -> None:
        """Record one finished task's outcomes (written at the next commit)."""
        task, ok, value = message
        entries = self.in_flight.pop(task, None)
        if entries is None:
            return  # cancelled by us: already put back
        self.running_items -= len(entries)
        if ok:
            for (position, key, _), outcome in zip(entries, value, strict=True):
                self._record(writes, position, key, outcome)
            return
        if isinstance(value, CancelledError):  # the pool dropped it before it ran
            for _, key, prior in entries:
                writes.revert(key, prior)
            raise value
        if self.aborted() and isinstance(value, ChildCrashedError):
            # Killed by the pool's own stop: the task may have done its work.  Its row
            # stays 'started', for the next run to treat as uncertain.
            raise value
        # A crash, a timeout, an outcome that did not load: every item of the task fails.
        text = value.__cause__.text if isinstance(value.__cause__, RemoteTraceback) else None
        for position, key, _ in entries:
            self._record(writes, position, key, failure(value, text, task.record.wall_time))

    def _finish_running(self, writes: Writes) -> None:
        """Wait for the tasks the pool runs anyway and record their outcomes, so that
        ``started`` without an outcome keeps meaning "its run died".  Not after Ctrl-C or
        a stop of the pool: it kills them, and they stay uncertain."""
        while self.in_flight:
            message = self.sink.get()
            try:
                self._settle(message, writes)
            except (CancelledError, ChildCrashedError):  # the pool was stopped meanwhile
                if self.aborted():
                    return

    def _record(self, writes: Writes, position: int, key: TaskKey, outcome: Any) -> None:
        if outcome[0] == "done":
            _, blob, seconds = outcome
            try:
                value = pickle.loads(blob)
            except Exception as exc:  # a class the parent cannot import: the item fails
                outcome = failure(exc, None, seconds)
            else:
                writes.done(key, seconds, blob)
                self.arrived.append((position, key, RESULT, value))
                return
        _, blob, type_name, message, text, seconds = outcome
        writes.failed(key, seconds, blob, type_name, message, text)
        self.arrived.append((position, key, ERROR,
                             stored_error(key, blob, type_name, message, text)))

    def _wind_up(self, store: Store, writes: Writes) -> None:
        """Leave the ledger true (see the module docstring), then close the run's row."""
        for entries, _ in self.staged:  # committed (or not) but never handed out
            for _, key, prior in entries:
                writes.revert(key, prior)
        self.staged.clear()
        for task, entries in list(self.in_flight.items()):
            if task.cancel():  # it never started, and now never will
                del self.in_flight[task]
                for _, key, prior in entries:
                    writes.revert(key, prior)
        try:
            if self.outcome != "interrupted" and not self.aborted():
                self._finish_running(writes)
        finally:
            writes.flush(store)
        store.execute(("UPDATE runs SET ended = ?, outcome = ?, total = coalesce(?, total) "
                       "WHERE id = ?", (time.time(), self.outcome, self.total, writes.run)))
