"""``ForkPool``: the public face of the pool, a ``concurrent.futures.Executor``.

It checks the options, builds the manager and the mode's dispatcher, and offers the
Executor API (``submit``, ``map``, ``shutdown``) plus ``imap_unordered``; everything that
happens to a task after ``submit`` is the manager's (see ``manager.py`` and the package
docstring for the data flow of each mode).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

from .._os.identity import IDENTITY
from ..errors import InvalidArgumentError
from . import signals
from .dispatcher import Dispatcher
from .forksafety import ForkSafety
from .manager import RUNNING, Manager
from .options import PoolOptions
from .per_task import ForkPerTask
from .progress import with_progress
from .streaming import stream_unordered
from .tasks import TaskFuture, apply_chunk, chunks
from .worker_loop import DEPTH
from .workers import PersistentWorkers
from .zygote import Zygote

__all__ = ["ForkPool"]

# Our own forks happen in the manager thread by design; the interpreter's generic warning
# about forking with threads (3.12+) is replaced by ForkSafetyWarning for *other* threads.
warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning,
                        module=r"ipcfork\.pool")


class ForkPool(Executor):
    """Run callables in forked children, one fresh child per task, at most ``max_workers``
    at a time; a ``concurrent.futures.Executor``.

    Nothing is pickled on the way in (lambdas, closures and large read-only data reach the
    child by copy-on-write); results come back through shared memory with at most one copy.

    ``timeout``: seconds a task may run before its child gets SIGTERM, then one SIGKILL
    ``grace`` seconds later; the task fails with TaskTimeoutError (unless it handed back a
    complete result meanwhile).  ``retries``: how many times a failed, crashed or timed-out
    task is run again.  ``initializer(*initargs)`` runs in each child before its task.
    ``max_load``: no new fork while the 1-minute load average is above it.
    ``handle_signals`` (default: when created in the main thread): SIGINT and SIGTERM stop
    the pool, kill and reap its children, restore the previous handlers and re-raise.
    ``forward_logs``: log records made in children go to the parent's loggers and handlers
    (every logger's own handlers are removed in the child), so I/O happens in the parent.
    ``tasks_per_child``: 1 forks a fresh child per task (nothing pickled); None keeps
    persistent workers (the call and its arguments are pickled); N recycles a worker after
    N tasks.  ``zygote=True`` forks a small helper now and every task's child from it, so
    forks stay cheap however large this process grows (calls are then pickled).
    ``hugepages=True`` backs this process's large private memory with transparent huge pages
    once, before the first fork, so forks from a big parent stay cheap and children still
    see all its data (see ``collapse_hugepages``; the report is in ``hugepages_report``).
    ``fork_safety_checks`` (default True): warn (ForkSafetyWarning) when this pool is made in
    a web server's worker, or forks while other threads run or while this process holds
    network or database connections every child would inherit.

    Raises InvalidArgumentError (a ValueError) for bad arguments; the message names the
    limit.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        tasks_per_child: int | None = 1,
        timeout: float | None = None,
        grace: float = 1.0,
        retries: int = 0,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_load: float | None = None,
        handle_signals: bool | None = None,
        forward_logs: bool = True,
        zygote: bool = False,
        hugepages: bool = False,
        fork_safety_checks: bool = True,
    ) -> None:
        options = PoolOptions.check(
            max_workers, tasks_per_child=tasks_per_child, timeout=timeout, grace=grace,
            retries=retries, initializer=initializer, initargs=initargs, max_load=max_load,
            handle_signals=handle_signals, forward_logs=forward_logs, zygote=zygote,
            hugepages=hugepages, fork_safety_checks=fork_safety_checks)
        self._options = options
        self._handles_signals = False
        ForkSafety(options.fork_safety_checks).at_pool_creation()  # "don't fork a web process"
        mode: Callable[[Manager], Dispatcher]
        if options.zygote:
            mode = Zygote  # forked now: before this process grows threads or a big heap
        elif options.persistent:
            mode = PersistentWorkers
        else:
            mode = ForkPerTask
        # Persistent workers queue DEPTH tasks each; a fork-per-task child's slot is read
        # after its replacement started, hence two per worker.
        slots = options.max_workers * (DEPTH if options.persistent else 2)
        self._manager = Manager(options, mode, slots)
        self._manager.start()
        if options.handle_signals:
            signals.register(self)
            self._handles_signals = True

    # -- the options, read-only -------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        return self._options.max_workers

    @property
    def tasks_per_child(self) -> int | None:
        return self._options.tasks_per_child

    @property
    def timeout(self) -> float | None:
        return self._options.timeout

    @property
    def grace(self) -> float:
        return self._options.grace

    @property
    def retries(self) -> int:
        return self._options.retries

    @property
    def max_load(self) -> float | None:
        return self._options.max_load

    @property
    def hugepages_report(self) -> Any:
        """What ``hugepages=True`` did before the first fork (None until then)."""
        return self._manager.hugepages_report

    # -- Executor API -----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)`` in a child; return its future.

        Raises RuntimeError after :meth:`shutdown` (as every Executor does) and
        InvalidArgumentError if ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentError(f"{fn!r} is not callable")
        return self._manager.submit(fn, args, kwargs)

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       in_flight: int | None = None, chunksize: int | None = None,
                       progress: bool = False, ledger: Any = None,
                       key: Callable[[Any], Any] | None = None,
                       fingerprint: Callable[[Any], Any] | None = None,
                       uncertain: str = "rerun", retry_failed: bool = True) -> Iterator[Any]:
        """Yield ``fn(item)`` for each item as results arrive, in completion order.

        The input is consumed lazily: at most ``in_flight`` items are in flight at a time
        (default: twice ``max_workers`` tasks; with persistent workers, twice their whole
        queue depth), so a generator of a million items keeps memory bounded.
        ``chunksize``: items per task.  The default (None) is one, except with persistent
        workers and no ``timeout`` or ``retries``, where short items travel in adaptive
        batches (a task of 2 ms or more still travels alone; see ``streaming``).  The first
        failed item's exception is raised from the iterator; tasks not yet started are
        cancelled when the iterator is closed.  ``progress=True`` shows a progress bar (tqdm
        when installed).  Raises InvalidArgumentError for a bad ``in_flight`` or
        ``chunksize``.

        ``ledger=PATH`` (or an ``ipcfork.Ledger``) makes the batch resumable; ``key``,
        ``fingerprint``, ``uncertain`` and ``retry_failed`` go with it: see
        docs/ledger.md.  Each item is then its own task unless ``chunksize`` says
        otherwise (no adaptive batches), and recorded results may come first.
        """
        if ledger is not None:
            results = self._ledger(fn, (iterable,), False,
                                   1 if chunksize is None else chunksize, in_flight,
                                   ledger, key, fingerprint, uncertain, retry_failed)
        else:
            results = self._imap_unordered(fn, iterable, in_flight, chunksize)
        if progress:
            return with_progress(results, _length((iterable,)), getattr(fn, "__name__", "tasks"))
        return results

    def _imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any],
                        in_flight: int | None, chunksize: int | None) -> Iterator[Any]:
        _check_sizes(in_flight, chunksize)
        options = self._options
        # Twice the workers (or their queues): a replacement is queued before the caller
        # takes a result, so the manager finds work waiting whenever a worker has room.
        depth = 2 * options.max_workers * (DEPTH if options.persistent else 1)
        adaptive = (chunksize is None and options.persistent and options.timeout is None
                    and not options.retries)
        if not callable(fn):
            raise InvalidArgumentError(f"{fn!r} is not callable")
        return stream_unordered(self._manager.stream_task, fn, iterable, in_flight=in_flight,
                                depth=depth, chunksize=None if adaptive else (chunksize or 1))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None,
            progress: bool = False, ledger: Any = None,
            key: Callable[[Any], Any] | None = None,
            fingerprint: Callable[[Any], Any] | None = None,
            uncertain: str = "rerun", retry_failed: bool = True) -> Iterator[Any]:
        """Like :func:`map`, computed in children; results in input order.

        ``chunksize`` items go to a child at a time.  The default is 1 with fork-per-task
        (every item gets its own fresh child) and, with persistent workers, a quarter of an
        even share per worker when the inputs have a length (as ``multiprocessing.Pool.map``
        does).  Raises the first failed item's exception when the iterator reaches it.
        ``progress=True`` shows a progress bar (tqdm when installed).

        ``ledger=PATH`` (or an ``ipcfork.Ledger``) makes the batch resumable: the same
        call made again after a crash yields the recorded results and runs only what is
        missing (``key``, ``fingerprint``, ``uncertain``, ``retry_failed``: see
        docs/ledger.md; ``timeout`` is not supported with it).
        """
        if ledger is not None:
            if timeout is not None:
                raise InvalidArgumentError("map(timeout=...) is not supported with ledger=; "
                                           "use ForkPool(timeout=...) for a per-task limit")
            results = self._ledger(fn, iterables, True, self._chunksize(iterables, chunksize),
                                   None, ledger, key, fingerprint, uncertain, retry_failed)
        else:
            results = self._map(fn, iterables, timeout, chunksize)
        if progress:
            return with_progress(results, _length(iterables), getattr(fn, "__name__", "tasks"))
        return results

    def _chunksize(self, iterables: tuple[Iterable[Any], ...], chunksize: int | None) -> int:
        if chunksize is None:
            chunksize = 1
            total = _length(iterables) if self._options.persistent else None
            if total is not None:
                chunksize = max(1, -(-total // (self.max_workers * 4)))
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise InvalidArgumentError(f"chunksize must be an int >= 1, not {chunksize!r}")
        return chunksize

    def _ledger(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                ordered: bool, chunksize: int, in_flight: int | None, ledger: Any,
                key: Any, fingerprint: Any, uncertain: Any, retry_failed: Any
                ) -> Iterator[Any]:
        """A resumable batch (``ipcfork.ledger.batch``): arguments checked here, the
        ledger opened at the first ``next``."""
        from ..ledger.batch import LedgerOptions, ledger_results

        options = LedgerOptions.check(ledger, key, fingerprint, uncertain, retry_failed)
        if not callable(fn):
            raise InvalidArgumentError(f"{fn!r} is not callable")
        _check_sizes(in_flight, chunksize)
        total = _length(iterables)
        items = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=False)
        manager, persistent = self._manager, self._options.persistent
        # A deeper window than a plain stream's when forking per task: new tasks reach the
        # pool only after their "started" rows are committed, and the pool must not run
        # dry meanwhile (persistent workers have their queues for that).
        return ledger_results(
            manager.stream_task, lambda: manager.abort_signal is not None, fn, items,
            options, star=len(iterables) > 1, chunksize=chunksize,
            depth=self.max_workers * (2 * DEPTH if persistent else 4), in_flight=in_flight,
            total=total, ordered=ordered)

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
             timeout: float | None, chunksize: int | None) -> Iterator[Any]:
        chunksize = self._chunksize(iterables, chunksize)
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        if len(iterables) == 1:  # items as they are: no 1-tuples to build, pickle, unpack
            batches = chunks(iterables[0], chunksize)
            apply = functools.partial(apply_chunk, fn)
        else:
            batches = chunks(zip(*iterables, strict=False), chunksize)
            apply = functools.partial(apply_chunk, fn, star=True)
        results = super().map(apply, batches, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``cancel_futures`` cancel those not started; with
        ``wait`` block until every child has been reaped, then restore signal handlers.

        Calling it again is harmless.  Done-callbacks of cancelled futures run in the
        calling thread.
        """
        self._manager.shutdown(wait, cancel_futures)
        if self._handles_signals:
            self._handles_signals = False
            signals.unregister(self)

    def abort(self, signum: int, *, kill_now: bool = False) -> None:
        """Stop at once (called from the signal handler): no new forks, children terminated
        and reaped before this returns (see ``Manager.abort`` for the bound on the wait)."""
        self._manager.abort(signum, kill_now)


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls ``iterables`` make (the shortest one's length), or None when one of
    them has no length."""
    if not all(hasattr(it, "__len__") for it in iterables):
        return None
    return min(len(it) for it in iterables)  # type: ignore[arg-type]


def _check_sizes(in_flight: int | None, chunksize: int | None) -> None:
    for value, what in ((in_flight, "in_flight"), (chunksize, "chunksize")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidArgumentError(f"{what} must be an int >= 1, not {value!r}")


@atexit.register
def _finish_at_exit() -> None:
    """At exit, as ``concurrent.futures`` does: stop taking work, finish what was
    submitted, reap every child (a pool the program dropped without shutting it down
    too: its manager is held until its loop ends)."""
    for manager in list(RUNNING):
        if IDENTITY.pid == manager.parent:
            manager.shutdown(wait=True, cancel_futures=False)
