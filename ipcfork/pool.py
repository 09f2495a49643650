"""ForkPool: the seed's fork manager as a ``concurrent.futures.Executor``.

Data flow of one task (``tasks_per_child=1``: a fresh child per task)::

    submit(fn, *args) ──> pending deque ──(manager thread: a slot is free)──> fork()
                                                                  │
       child: die-with-parent, reset signals, initializer, fn(*args)
              └─> write ONE outcome (result, or exception + traceback text) into a fresh
                  POSIX shm object named by the parent before the fork, mark it complete,
                  os._exit()  (or die: SIGKILL, SIGSEGV, os._exit, timeout)
                                                                  │
    manager: the child's pidfd polls readable ──> wait4 (status + rusage)
             ──> read the outcome from shm (only now) ──> resolve the Future
                 result / same exception type with the child's traceback as __cause__ /
                 ChildCrashedError(pid, exit code or signal) / TaskTimeoutError

What makes the hand-off race-free: the parent reads the outcome only after ``wait4`` has
returned for the child.  Process exit orders every store the child made before it, and the
outcome's ``done`` word, written last, equals its size only if the child finished writing.
A child that died midway leaves ``done == 0`` (or no object), which reads as a crash.

The manager is one background thread per pool: it forks (so a child's parent-death signal is
tied to a thread that outlives it), watches pidfds, enforces timeouts and retries.  The
seed's rules become options: ``initializer`` (fresh connections in each child),
``max_load`` (hold back forks while the machine is overloaded), a warning when forking with
other threads alive, signal handling in the main thread (see ``_signals.py``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import queue
import resource
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from ._child import run_task_in_child
from ._identity import IDENTITY
from ._reaper import ChildWatch, Exit
from ._signals import PoolSignals
from ._timeouts import check_timeout
from ._transfer import EXCEPTION, OutcomeArena, discard_outcome, outcome_name
from .errors import (
    ChildCrashedError,
    ForkSafetyWarning,
    InvalidArgumentError,
    RemoteTraceback,
    TaskTimeoutError,
)

__all__ = ["ForkPool", "TaskFuture", "TaskRecord"]

_FD_RESERVE = 64  # descriptors kept free for the caller when capping concurrency
_LOAD_RECHECK = 0.5  # seconds between load checks while forks are held back

# Our own forks happen in the manager thread by design; the interpreter's generic warning
# about forking with threads (3.12+) is replaced by ForkSafetyWarning for *other* threads.
warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning,
                        module=r"ipcfork\.pool")


@dataclass
class TaskRecord:
    """What happened to one task: the child's pid and exit, timings and resource usage."""

    task_id: int
    attempts: int = 0
    pid: int | None = None
    exitcode: int | None = None
    signal: int | None = None
    wall_time: float | None = None
    maxrss_kib: int | None = None
    utime: float | None = None
    stime: float | None = None
    outcome: str = "pending"  # result, exception, crash, timeout, cancelled


class TaskFuture(Future[Any]):
    """A Future that also carries its task's :class:`TaskRecord` as ``record``."""

    def __init__(self, task_id: int) -> None:
        super().__init__()
        self.record = TaskRecord(task_id)


@dataclass
class _Work:
    future: TaskFuture
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Running:
    work: _Work
    pid: int
    slot: int
    spill: str
    started: float
    deadline: float | None
    terminated_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover
        return os.cpu_count() or 1


class ForkPool(Executor):
    """Run callables in forked children, one fresh child per task, at most ``max_workers``
    at a time; a ``concurrent.futures.Executor``.

    Nothing is pickled on the way in (lambdas, closures and large read-only data reach the
    child by copy-on-write); results come back through shared memory with at most one copy.

    ``timeout``: seconds a task may run before its child gets SIGTERM, then SIGKILL after
    ``grace`` seconds; the task fails with TaskTimeoutError.  ``retries``: how many times a
    failed, crashed or timed-out task is run again.  ``initializer(*initargs)`` runs in each
    child before its task.  ``max_load``: no new fork while the 1-minute load average is
    above it.  ``handle_signals`` (default: when created in the main thread): SIGINT and
    SIGTERM stop the pool, kill and reap its children, restore the previous handlers and
    re-raise.

    Raises InvalidArgumentError for bad arguments (the message names the limit).
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
    ) -> None:
        fd_cap = max(1, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - _FD_RESERVE) // 2)
        if max_workers is None:
            max_workers = min(_default_workers(), fd_cap)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or not (
                1 <= max_workers <= fd_cap):
            raise InvalidArgumentError(
                f"max_workers must be an int in 1..{fd_cap}, not {max_workers!r}",
                limit=f"1..{fd_cap} (half of RLIMIT_NOFILE less {_FD_RESERVE})")
        if tasks_per_child != 1:
            raise InvalidArgumentError(
                "only tasks_per_child=1 (a fresh child per task) is available so far",
                limit="tasks_per_child == 1")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an int >= 0, not {retries!r}")
        if initializer is not None and not callable(initializer):
            raise InvalidArgumentError("initializer must be callable")
        self.max_workers = max_workers
        self.timeout = check_timeout(timeout, "timeout")
        self.grace = check_timeout(grace, "grace") or 0.0
        self.retries = retries
        self.max_load = max_load
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._ids = itertools.count(1)
        self._pending: collections.deque[_Work] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._watch = ChildWatch()
        self._arena = OutcomeArena(max_workers)
        self._free_slots = list(range(max_workers))
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._abort_signal: int | None = None
        self._kill_now = False
        self._warned_threads = False
        self._parent = IDENTITY.pid
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        self._signals = PoolSignals(self) if handle_signals else None
        # Children must not outlive an interpreter that forgot to shut the pool down.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # -- Executor API -----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)`` in a child; return its future.

        Raises RuntimeError after :meth:`shutdown` (as every Executor does).
        """
        if not callable(fn):
            raise InvalidArgumentError(f"{fn!r} is not callable")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = TaskFuture(next(self._ids))
            self._pending.append(_Work(future, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._manage, name="ipcfork-pool",
                                                daemon=True)
                self._thread.start()
        self._watch.wake()
        return future

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       in_flight: int | None = None) -> Iterator[Any]:
        """Yield ``fn(item)`` for each item as results arrive, in completion order.

        The input is consumed lazily: at most ``in_flight`` (default ``max_workers``) tasks
        exist at a time, so a generator of a million items keeps memory bounded.  The first
        failed task's exception is raised from the iterator; the tasks still running are
        cancelled or abandoned when the iterator is closed.
        """
        limit = in_flight or self.max_workers
        done: queue.SimpleQueue[TaskFuture] = queue.SimpleQueue()
        items = iter(iterable)
        active: set[TaskFuture] = set()
        try:
            for item in items:
                future = self.submit(fn, item)
                future.add_done_callback(done.put)  # type: ignore[arg-type]
                active.add(future)
                while len(active) >= limit:
                    finished = done.get()
                    active.discard(finished)
                    yield finished.result()
            while active:
                finished = done.get()
                active.discard(finished)
                yield finished.result()
        finally:
            for future in active:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``cancel_futures`` drop those not started; with
        ``wait`` block until every child has been reaped and handlers are restored."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft().future.cancel()
            thread = self._thread
        self._watch.wake()
        if self._signals is not None:
            self._signals.restore()
        if wait:
            if thread is not None:
                thread.join()
            self._watch_close()
            self._arena.close()

    def _watch_close(self) -> None:
        with self._lock:
            watch, self._watch = self._watch, _ClosedWatch()  # type: ignore[assignment]
        if isinstance(watch, ChildWatch):
            watch.close()

    # -- the manager thread ---------------------------------------------------------------

    def _manage(self) -> None:
        try:
            while True:
                self._start_pending()
                exits = self._watch.wait(self._next_wakeup())
                for exited in exits:
                    self._resolve(exited)
                self._enforce_timeouts()
                if self._abort_signal is not None:
                    self._abort_children()
                    return
                with self._lock:
                    if self._shutdown and not self._pending and not self._running:
                        return
        except BaseException as exc:  # pragma: no cover - a bug: fail every future loudly
            self._fail_everything(exc)
            raise

    def _load_allows_fork(self) -> bool:
        return self.max_load is None or os.getloadavg()[0] <= self.max_load

    def _start_pending(self) -> None:
        while True:
            with self._lock:
                if (not self._pending or len(self._running) >= self.max_workers
                        or self._abort_signal is not None):
                    return
                if not self._load_allows_fork() and self._running:
                    return  # hold back; forks resume when the load drops or a child ends
                work = self._pending.popleft()
            # A retried task's future is already running; a new one may have been cancelled.
            if not (work.future.running() or work.future.set_running_or_notify_cancel()):
                work.future.record.outcome = "cancelled"
                continue
            self._fork(work)

    def _fork(self, work: _Work) -> None:
        self._warn_about_threads()
        record = work.future.record
        record.attempts += 1
        spill = outcome_name(self._parent, record.task_id)
        arena = self._arena
        slot = self._free_slots.pop()
        arena.prepare(slot)

        def write(kind: int, payload: Any) -> None:
            arena.write(slot, kind, payload, spill)

        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            run_task_in_child(self._parent, write, work.fn, work.args, work.kwargs,
                              self._initializer, self._initargs)
        self._watch.add(pid)
        deadline = None if self.timeout is None else started + self.timeout
        with self._lock:
            self._running[pid] = _Running(work, pid, slot, spill, started, deadline)
        record.pid = pid

    def _warn_about_threads(self) -> None:
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and t is not threading.main_thread()
                  and not t.name.startswith("ipcfork-")]
        if others and not self._warned_threads:
            self._warned_threads = True
            names = ", ".join(t.name for t in others[:5])
            warnings.warn(
                f"ForkPool forks while other threads run ({names}); a child that needs a "
                "lock one of them held at fork time will deadlock", ForkSafetyWarning,
                stacklevel=2)

    def _next_wakeup(self) -> float | None:
        now = time.monotonic()
        waits = []
        with self._lock:
            for run in self._running.values():
                if run.terminated_at is not None:
                    waits.append(run.terminated_at + self.grace - now)
                elif run.deadline is not None:
                    waits.append(run.deadline - now)
            if self._pending and self._running and not self._load_allows_fork():
                waits.append(_LOAD_RECHECK)
        return max(0.0, min(waits)) if waits else None

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [r for r in self._running.values()
                       if r.deadline is not None and now >= r.deadline]
        for run in overdue:
            if run.terminated_at is None:
                run.terminated_at = now
                run.extra["timed_out"] = True
                _kill(run.pid, signal.SIGTERM)
            elif now >= run.terminated_at + self.grace:
                _kill(run.pid, signal.SIGKILL)

    def _resolve(self, exited: Exit) -> None:
        with self._lock:
            run = self._running.pop(exited.pid)
        future = run.work.future
        record = future.record
        record.exitcode, record.signal = exited.exitcode, exited.signal
        record.wall_time = time.monotonic() - run.started
        record.maxrss_kib, record.utime, record.stime = (exited.maxrss_kib, exited.utime,
                                                         exited.stime)
        load_error: BaseException | None = None
        try:
            outcome = self._arena.read(run.slot)
        except Exception as exc:  # the result failed to load in the parent
            outcome, load_error = None, exc
            record.outcome = "exception"
        finally:
            discard_outcome(run.spill)  # a child that died mid-spill leaves it behind
            self._free_slots.append(run.slot)
        if outcome is not None and outcome[0] != EXCEPTION and not run.extra.get("timed_out"):
            record.outcome = "result"
            future.set_result(outcome[1])
            return
        error = load_error or self._failure(run, exited, outcome)
        if record.attempts <= self.retries and self._abort_signal is None:
            with self._lock:
                self._pending.appendleft(run.work)  # run it again, before newer tasks
            return
        future.set_exception(error)

    def _failure(self, run: _Running, exited: Exit,
                 outcome: tuple[int, Any] | None) -> BaseException:
        record = run.work.future.record
        if run.extra.get("timed_out"):
            record.outcome = "timeout"
            return TaskTimeoutError(
                f"task {record.task_id} ran past {self.timeout} s; its child {exited.pid} "
                f"was terminated", limit=f"timeout={self.timeout}")
        if outcome is not None:
            record.outcome = "exception"
            exc, text_repr, text = outcome[1]
            if exc is None:
                exc = ChildCrashedError(f"task raised an unpicklable exception: {text_repr}",
                                        pid=exited.pid, exitcode=exited.exitcode)
            exc.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
            return exc  # type: ignore[no-any-return]
        record.outcome = "crash"
        if exited.signal is not None:
            how = f"was killed by signal {exited.signal} ({signal.Signals(exited.signal).name})"
        else:
            how = f"exited with status {exited.exitcode} without handing back an outcome"
        return ChildCrashedError(f"task {record.task_id}: child {exited.pid} {how}",
                                 pid=exited.pid, exitcode=exited.exitcode,
                                 signal=exited.signal)

    # -- stopping -----------------------------------------------------------------------

    def _abort_children(self) -> None:
        """Stop on a signal: cancel what has not started, TERM then KILL the rest, reap."""
        with self._lock:
            self._shutdown = True
            pending, self._pending = list(self._pending), collections.deque()
            running = list(self._running.values())
        for work in pending:
            work.future.cancel()
        for run in running:
            _kill(run.pid, signal.SIGKILL if self._kill_now else signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while True:
            with self._lock:
                if not self._running:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._kill_now:
                with self._lock:
                    pids = list(self._running)
                for pid in pids:
                    _kill(pid, signal.SIGKILL)
                remaining = 1.0
            for exited in self._watch.wait(remaining):
                self._resolve(exited)

    def abort(self, signum: int, *, kill_now: bool = False) -> None:
        """Stop at once (called from the signal handler): no new forks, children terminated
        and reaped before this returns."""
        self._kill_now = self._kill_now or kill_now
        self._abort_signal = signum
        self._watch.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._watch_close()

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            works = list(self._pending) + [r.work for r in self._running.values()]
            self._pending.clear()
        for work in works:
            if not work.future.done():
                work.future.set_exception(exc)


class _ClosedWatch:
    """Stands in for a closed ChildWatch so late wake-ups are harmless."""

    def wake(self) -> None:
        pass


def _shutdown_at_exit(ref: weakref.ref[ForkPool]) -> None:
    pool = ref()
    if pool is not None and IDENTITY.pid == pool._parent:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
