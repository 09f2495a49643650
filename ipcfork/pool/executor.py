"""ForkPool: the seed's fork manager as a ``concurrent.futures.Executor``.

Data flow of one task (``tasks_per_child=1``: a fresh child per task)::

    submit(fn, *args) ──> pending deque ──(manager thread: a slot is free)──> fork()
                                                                  │
       child: die-with-parent, reset signals, initializer, fn(*args)
              └─> write ONE outcome (result, or exception + traceback text) into its slot of
                  the pool's shared-memory arena (a large one into its own shm object, named
                  by the parent before the fork), write the slot's done word last,
                  os._exit()  (or die: SIGKILL, SIGSEGV, os._exit, timeout)
                                                                  │
    manager: the child's pidfd polls readable ──> wait4 (status + rusage)
             ──> read the outcome from shm (only now) ──> resolve the Future
                 result / same exception type with the child's traceback as __cause__ /
                 ChildCrashedError(pid, exit code or signal) / TaskTimeoutError

What makes the hand-off race-free: the parent reads the outcome only after ``wait4`` has
returned for the child (persistent workers: after the completion notice the worker writes
once the slot is complete).  Process exit orders every store the child made before it, and
the slot's ``done`` word, written last, equals its length only if the child finished
writing.  A child that died midway leaves ``done == 0``, which reads as a crash.

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
import errno
import functools
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
from concurrent.futures import Executor
from typing import Any

from .._os.identity import IDENTITY
from .._os.timeouts import check_timeout
from .._os.translate import fork_error
from ..errors import (
    ForkSafetyWarning,
    InvalidArgumentError,
)
from . import signals as _signals
from .child import run_task_in_child
from .logs import LogChannel
from .progress import with_progress
from .reaper import ChildWatch, Exit
from .tasks import (
    Running,
    TaskFuture,
    TaskRecord,
    Work,
    apply_chunk,
    chunks,
    drop,
    kill,
    task_failure,
)
from .transfer import EXCEPTION, OutcomeArena, discard_outcome, outcome_name
from .worker_loop import DEPTH, Worker
from .workers import WorkerDispatch
from .zygote import ZygoteDispatch

__all__ = ["ForkPool", "TaskFuture", "TaskRecord"]

_FD_RESERVE = 64  # descriptors kept free for the caller when capping concurrency
_LOAD_RECHECK = 0.5  # seconds between load checks while forks are held back

# Our own forks happen in the manager thread by design; the interpreter's generic warning
# about forking with threads (3.12+) is replaced by ForkSafetyWarning for *other* threads.
warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning,
                        module=r"ipcfork\.pool")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover
        return os.cpu_count() or 1


class ForkPool(WorkerDispatch, ZygoteDispatch, Executor):
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
    re-raise.  ``forward_logs``: log records made in children go to the parent's loggers and
    handlers (the children's own handlers are removed), so I/O happens in the parent.
    ``tasks_per_child``: 1 forks a fresh child per task (nothing pickled); None keeps
    persistent workers (the call and its arguments are pickled); N recycles a worker after
    N tasks.  ``zygote=True`` forks a small helper now and every task's child from it, so
    forks stay cheap however large this process grows (calls are then pickled).

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
        forward_logs: bool = True,
        zygote: bool = False,
    ) -> None:
        fd_cap = max(1, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - _FD_RESERVE) // 2)
        if max_workers is None:
            max_workers = min(_default_workers(), fd_cap)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or not (
                1 <= max_workers <= fd_cap):
            raise InvalidArgumentError(
                f"max_workers must be an int in 1..{fd_cap}, not {max_workers!r}",
                limit=f"1..{fd_cap} (half of RLIMIT_NOFILE less {_FD_RESERVE})")
        if tasks_per_child is not None and (
                isinstance(tasks_per_child, bool) or not isinstance(tasks_per_child, int)
                or tasks_per_child < 1):
            raise InvalidArgumentError(
                f"tasks_per_child must be None or an int >= 1, not {tasks_per_child!r}",
                limit="None or >= 1")
        if zygote and tasks_per_child != 1:
            raise InvalidArgumentError("zygote=True forks a child per task: it needs "
                                       "tasks_per_child=1", limit="tasks_per_child == 1")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an int >= 0, not {retries!r}")
        if initializer is not None and not callable(initializer):
            raise InvalidArgumentError("initializer must be callable")
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        elif handle_signals and threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError("handle_signals=True needs the main thread: Python "
                                       "runs signal handlers there only")
        self.max_workers = max_workers
        self.tasks_per_child = tasks_per_child
        self._persistent = tasks_per_child != 1
        self.timeout = check_timeout(timeout, "timeout")
        self.grace = check_timeout(grace, "grace") or 0.0
        self._handles_signals = bool(handle_signals)
        self.retries = retries
        self.max_load = max_load
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._ids = itertools.count(1)
        self._pending: collections.deque[Work] = collections.deque()
        self._running: dict[int, Running] = {}
        self._lock = threading.Lock()
        self._workers: dict[int, Worker] = {}
        self._worker_by_fd: dict[int, Worker] = {}
        self._zygote = zygote
        self._zygote_pid = None
        self._zygote_cmd = self._zygote_events = -1
        self._zygote_rest = b""
        self._zygote_outbox = bytearray()
        self._zruns: dict[int, Running] = {}
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._abort_signal: int | None = None
        self._kill_now = False
        self._warned_threads = False
        self._manager_asleep = True  # a submit wakes the manager only when it sleeps
        self._new_work = False
        self._parent = IDENTITY.pid
        self._tag = os.urandom(4).hex()
        # Persistent workers queue DEPTH tasks each; a fork-per-task child's slot is read
        # after its replacement started (see _handle_events), hence two per worker.
        slots = max_workers * (DEPTH if self._persistent else 2)
        self._free_slots = list(range(slots))
        # Resources last, each released again if a later step fails.
        self._watch = ChildWatch()
        self._logs = None
        try:
            self._arena = OutcomeArena(slots)
            self._logs = LogChannel() if forward_logs else None
            if self._logs is not None:
                self._watch.add_reader(self._logs.fd)
            if zygote:
                self._start_zygote()  # now: before this process grows threads or a big heap
        except BaseException:
            self._release_resources()
            raise
        if self._handles_signals:
            _signals.register(self)
        # Children must not outlive an interpreter that forgot to shut the pool down.
        _LIVE_POOLS.add(self)

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
            self._pending.append(Work(future, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._manage, name="ipcfork-pool",
                                                daemon=True)
                self._thread.start()
            wake, self._manager_asleep = self._manager_asleep, False
            self._new_work = True
        if wake:  # a busy manager sees the new task on its next round anyway
            self._watch.wake()
        return future

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       in_flight: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Yield ``fn(item)`` for each item as results arrive, in completion order.

        The input is consumed lazily: at most ``in_flight`` tasks exist at a time (default:
        twice ``max_workers``; with persistent workers, twice their whole queue depth), so a
        generator of a million items keeps memory bounded.  The first failed task's
        exception is raised from the iterator; tasks not yet started are cancelled when the
        iterator is closed.  ``progress=True`` shows a progress bar (tqdm when installed).
        """
        results = self._imap_unordered(fn, iterable, in_flight)
        if progress:
            total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
            return with_progress(results, total, getattr(fn, "__name__", "tasks"))
        return results

    def _imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any],
                        in_flight: int | None) -> Iterator[Any]:
        if in_flight is not None and (isinstance(in_flight, bool) or not isinstance(
                in_flight, int) or in_flight < 1):
            raise InvalidArgumentError(f"in_flight must be an int >= 1, not {in_flight!r}")
        # Twice the workers (or their queues): a replacement is queued before the caller
        # takes a result, so the manager finds work waiting whenever a worker has room.
        limit = in_flight or 2 * self.max_workers * (DEPTH if self._persistent else 1)
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

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None,
            progress: bool = False) -> Iterator[Any]:
        """Like :func:`map`, computed in children; results in input order.

        ``chunksize`` items go to a child at a time.  The default is 1 with fork-per-task
        (every item gets its own fresh child) and, with persistent workers, a quarter of an
        even share per worker when the inputs have a length (as ``multiprocessing.Pool.map``
        does).  Raises the first failed item's exception when the iterator reaches it.
        ``progress=True`` shows a progress bar (tqdm when installed).
        """
        results = self._map(fn, iterables, timeout, chunksize)
        if progress:
            sizes = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
            total = min(sizes) if len(sizes) == len(iterables) else None
            return with_progress(results, total, getattr(fn, "__name__", "tasks"))
        return results

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
             timeout: float | None, chunksize: int | None) -> Iterator[Any]:
        if chunksize is None:
            chunksize = 1
            if self._persistent and all(hasattr(it, "__len__") for it in iterables):
                total = min(len(it) for it in iterables)  # type: ignore[arg-type]
                chunksize = max(1, -(-total // (self.max_workers * 4)))
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise InvalidArgumentError(f"chunksize must be an int >= 1, not {chunksize!r}")
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
        with self._lock:
            self._shutdown = True
            pending = list(self._pending) if cancel_futures else []
            if cancel_futures:
                self._pending.clear()
            if self._thread is None and self._zygote_pid is not None:
                # Never used, but its zygote runs: let a manager round stop it.
                self._thread = threading.Thread(target=self._manage, name="ipcfork-pool",
                                                daemon=True)
                self._thread.start()
            thread = self._thread
        # Cancel outside the lock: done-callbacks are user code and may call back in.
        keep = [work for work in pending if not work.future.cancel()]
        if keep:  # retried tasks are running already: they stay queued and run again
            with self._lock:
                self._pending.extendleft(reversed(keep))
        self._watch.wake()
        if not wait:
            self._drop_signals()
            return
        if thread is not None:
            thread.join()  # a Ctrl-C here still reaches our handler: children get killed
        else:
            self._release_resources()
        self._drop_signals()

    def _drop_signals(self) -> None:
        if self._handles_signals:
            self._handles_signals = False
            _signals.unregister(self)

    def _release_resources(self) -> None:
        """Close the watcher, arena and log channel (by the manager as it exits, or by
        shutdown when no manager ever ran).  Idempotent."""
        with self._lock:
            watch, self._watch = self._watch, _ClosedWatch()  # type: ignore[assignment]
            logs, self._logs = self._logs, None
        if isinstance(watch, ChildWatch):
            watch.close()
        if hasattr(self, "_arena"):
            self._arena.close()
        if logs is not None:
            logs.close()
        if self._zygote_pid is not None:  # a zygote whose pool never ran: stop it here
            self._close_zygote_commands()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._zygote_pid, 0)
            self._zygote_pid = None
        _LIVE_POOLS.discard(self)

    # -- the manager thread ---------------------------------------------------------------

    def _manage(self) -> None:
        try:
            while True:
                if self._persistent:
                    self._dispatch_to_workers()
                elif self._zygote:
                    self._zygote_dispatch()
                else:
                    self._start_pending()
                with self._lock:
                    self._manager_asleep = True
                    new_work, self._new_work = self._new_work, False
                # Work submitted while we were busy did not wake us: look again at once.
                exits = self._watch.wait(0.0 if new_work else self._next_wakeup())
                with self._lock:
                    self._manager_asleep = False
                self._handle_events(exits)
                self._enforce_timeouts()
                if self._abort_signal is not None:
                    self._abort_children()
                    return
                if self._finished():
                    return
        except BaseException as exc:  # pragma: no cover - a bug: fail every future loudly
            self._fail_everything(exc)
            raise
        finally:
            if self._logs is not None:
                self._logs.drain()
            self._release_resources()

    def _child_setup(self) -> None:
        """Runs in every child right after the fork."""
        if self._logs is not None:
            self._logs.install_in_child()

    def _handle_events(self, exits: list[Exit]) -> None:
        # Log records first, so a task's records reach the handlers before its future
        # resolves; then completion notices (a worker that exited may have posted some).
        # Whenever something finished: a child queues its records before it posts a
        # notice or exits (poll may have looked at the log socket just before that).
        if self._logs is not None and (exits or self._watch.ready):
            self._logs.drain()
        for fd in self._watch.ready:
            worker = self._worker_by_fd.get(fd)
            if worker is not None:
                self._on_notices(worker)
            elif fd == self._zygote_events:
                self._on_zygote_events()
        for fd in self._watch.writable:
            if fd == self._zygote_cmd:
                self._zygote_flush()
            else:
                self._flush_worker(fd)
        finished = []
        for exited in exits:
            if exited.pid in self._workers:
                self._on_worker_exit(exited)
            elif exited.pid == self._zygote_pid:
                self._on_zygote_exit(exited)
            else:
                with self._lock:
                    finished.append((self._running.pop(exited.pid), exited))
        if finished:
            try:
                # Fork the replacements before reading large (spilled) outcomes: copying
                # one takes tens of milliseconds, and the next children run meanwhile (each
                # has a spare arena slot for this).  Small ones are settled first, as a
                # fork takes a millisecond.  Not with retries: a failed task must run again
                # before newer ones.
                if (not self.retries and not self._persistent and not self._zygote
                        and any(self._arena.spilled(run.slot) for run, _ in finished)):
                    self._start_pending()
            finally:
                for run, exited in finished:
                    self._resolve(run, exited)

    def _finished(self) -> bool:
        """True once shut down with nothing left; stops idle workers on the way."""
        with self._lock:
            if not self._shutdown or self._pending or self._running or self._zruns:
                return False
        for worker in self._workers.values():
            if not worker.inflight:
                worker.stop()  # EOF on its task pipe: it exits
        zygote_gone = self._zygote_finish()  # EOF on its command pipe: it exits
        return not self._workers and zygote_gone

    def _load_allows_fork(self) -> bool:
        return self.max_load is None or os.getloadavg()[0] <= self.max_load

    def _start_pending(self) -> None:
        while (work := self._next_startable(len(self._running))) is not None:
            if not self._fork(work):
                return  # out of processes for now: the next child's exit brings us back

    def _fork(self, work: Work) -> bool:
        """Fork a child for ``work``; False if the system is out of processes or memory
        while children of ours run (the task goes back to the front of the queue, to be
        forked when one of them has ended)."""
        self._warn_about_threads()
        record = work.future.record
        record.attempts += 1
        spill = outcome_name(self._parent, self._tag, record.task_id, record.attempts)
        arena = self._arena
        slot = self._free_slots.pop()
        arena.prepare(slot)

        def write(kind: int, payload: Any) -> None:
            arena.write(slot, kind, payload, spill)

        started = time.monotonic()
        try:
            pid = os.fork()
        except OSError as exc:
            self._free_slots.append(slot)
            if exc.errno in (errno.EAGAIN, errno.ENOMEM) and self._running:
                record.attempts -= 1  # not an attempt: it never ran
                with self._lock:
                    self._pending.appendleft(work)
                return False
            # With no child of ours to wait for, nothing would free the resource: this
            # task fails, the pool lives.
            record.outcome = "crash"
            work.future.set_exception(fork_error(exc))
            return True
        if pid == 0:  # the child: never returns
            run_task_in_child(self._parent, write, work.fn, work.args, work.kwargs,
                              self._initializer, self._initargs, self._child_setup)
        deadline = None if self.timeout is None else started + self.timeout
        with self._lock:
            self._running[pid] = Running(work, pid, slot, spill, started, deadline)
        record.pid = pid
        self._watch.add(pid)
        return True

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
        if self.timeout is None:  # no deadline and nothing terminating (only timeouts do)
            with self._lock:
                held_back = (self._pending and self._running
                             and not self._load_allows_fork())
            return _LOAD_RECHECK if held_back else None
        now = time.monotonic()
        waits = []
        for worker in self._workers.values():
            if worker.terminated_at is not None:
                waits.append(worker.terminated_at + self.grace - now)
            elif worker.inflight and worker.inflight[0].deadline is not None:
                waits.append(worker.inflight[0].deadline - now)
        with self._lock:
            for run in self._running.values():
                if run.terminated_at is not None:
                    waits.append(run.terminated_at + self.grace - now)
                elif run.deadline is not None:
                    waits.append(run.deadline - now)
            if self._pending and self._running and not self._load_allows_fork():
                waits.append(_LOAD_RECHECK)
        for run in self._zruns.values():
            if run.terminated_at is not None:
                waits.append(run.terminated_at + self.grace - now)
            elif run.deadline is not None:
                waits.append(run.deadline - now)
        return max(0.0, min(waits)) if waits else None

    def _enforce_timeouts(self) -> None:
        if self.timeout is None:
            return
        now = time.monotonic()
        self._zygote_timeouts(now)
        with self._lock:
            overdue = [r for r in self._running.values()
                       if r.deadline is not None and now >= r.deadline]
        for run in overdue:
            if run.terminated_at is None:
                run.terminated_at = now
                run.timed_out = True
                kill(run.pid, signal.SIGTERM)
            elif now >= run.terminated_at + self.grace:
                kill(run.pid, signal.SIGKILL)
        for worker in self._workers.values():
            head = worker.inflight[0] if worker.inflight else None
            if worker.terminated_at is not None:
                if now >= worker.terminated_at + self.grace:
                    kill(worker.pid, signal.SIGKILL)
            elif head is not None and head.deadline is not None and now >= head.deadline:
                worker.terminated_at = now
                worker.timed_out = head  # its running task is the one that timed out
                kill(worker.pid, signal.SIGTERM)

    def _resolve(self, run: Running, exited: Exit) -> None:
        """A fork-per-task child exited (and left ``_running``): settle its task."""
        record = run.work.future.record
        record.exitcode, record.signal = exited.exitcode, exited.signal
        record.wall_time = time.monotonic() - run.started
        record.maxrss_kib, record.utime, record.stime = (exited.maxrss_kib, exited.utime,
                                                         exited.stime)
        outcome, load_error = self._read_slot(run.slot, run.spill)
        self._free_slots.append(run.slot)
        self._settle(run.work, outcome, load_error, exited=exited,
                     timed_out=run.timed_out)

    def _read_slot(self, slot: int, spill: str) -> tuple[tuple[int, Any] | None,
                                                         BaseException | None]:
        """The outcome in ``slot`` (None if incomplete) or the error loading it raised."""
        try:
            outcome = self._arena.read(slot)
        except Exception as exc:  # the result failed to load in the parent
            discard_outcome(spill)
            return None, exc
        if outcome is None:
            discard_outcome(spill)  # a child that died mid-spill may have left it behind
        return outcome, None

    def _settle(self, work: Work, outcome: tuple[int, Any] | None,
                load_error: BaseException | None, *, exited: Exit | None,
                timed_out: bool) -> None:
        """Resolve a task's future from its outcome, or run it again if retries remain."""
        future = work.future
        record = future.record
        if outcome is not None and outcome[0] != EXCEPTION and not timed_out:
            record.outcome = "result"
            future.set_result(outcome[1])
            return
        if load_error is not None:
            record.outcome = "exception"
            error = load_error
        else:
            error = task_failure(work, exited, outcome, timed_out, self.timeout)
        if record.attempts <= self.retries and self._abort_signal is None:
            with self._lock:
                self._pending.appendleft(work)  # run it again, before newer tasks
            return
        future.set_exception(error)

    # -- stopping -----------------------------------------------------------------------

    def _abort_children(self) -> None:
        """Stop on a signal: cancel what has not started, TERM then KILL the rest, reap."""
        with self._lock:
            self._shutdown = True
            pending, self._pending = list(self._pending), collections.deque()
            running = list(self._running.values())
        for work in pending:
            drop(work)
        first = signal.SIGKILL if self._kill_now else signal.SIGTERM
        for pid in [run.pid for run in running] + list(self._workers):
            kill(pid, first)
        for run in self._zruns.values():
            self._zygote_signal(run, first)
        self._close_zygote_commands()  # the zygote exits once its children are reaped
        deadline = time.monotonic() + self.grace
        while True:
            with self._lock:
                if not self._running and not self._workers and self._zygote_pid is None:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._kill_now:
                with self._lock:
                    pids = list(self._running) + list(self._workers)
                if self._zygote_pid is not None:
                    pids.append(self._zygote_pid)  # its children die with it
                for pid in pids:
                    kill(pid, signal.SIGKILL)
                remaining = 1.0
            self._handle_events(self._watch.wait(remaining))
            with self._lock:
                requeued, self._pending = list(self._pending), collections.deque()
            for work in requeued:  # requeued by a dying worker: drop them too
                drop(work)

    def abort(self, signum: int, *, kill_now: bool = False) -> None:
        """Stop at once (called from the signal handler): no new forks, children terminated
        and reaped by the manager before this returns.

        The wait is bounded: if the manager cannot finish (it may need a lock the
        interrupted code holds), every known child is SIGKILLed and we return; the manager
        reaps them once that code unwinds.
        """
        self._kill_now = self._kill_now or kill_now
        self._abort_signal = signum
        self._shutdown = True
        thread = self._thread
        if thread is None:
            self._release_resources()  # nothing ran; stop a zygote if there is one
            return
        self._watch.wake()
        if thread is not threading.current_thread():
            thread.join(self.grace + 5.0)
            if thread.is_alive():
                pids = list(self._running) + list(self._workers)
                if self._zygote_pid is not None:
                    pids.append(self._zygote_pid)
                for pid in pids:
                    kill(pid, signal.SIGKILL)

    def _fail_everything(self, exc: BaseException) -> None:
        """The manager hit a bug: refuse new work, kill the children, fail every future."""
        with self._lock:
            self._shutdown = True
            works = list(self._pending) + [r.work for r in self._running.values()]
            works += [r.work for r in self._zruns.values()]
            works += [f.work for w in self._workers.values() for f in w.inflight]
            self._pending.clear()
        pids = list(self._running) + list(self._workers)
        if self._zygote_pid is not None:
            pids.append(self._zygote_pid)
        for pid in pids:
            kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for work in works:
            if not work.future.done():
                work.future.set_exception(exc)


class _ClosedWatch:
    """Stands in for a closed ChildWatch so late wake-ups are harmless."""

    def wake(self) -> None:
        pass


_LIVE_POOLS: weakref.WeakSet[ForkPool] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    """Children must not outlive an interpreter that forgot to shut a pool down."""
    for pool in list(_LIVE_POOLS):
        if IDENTITY.pid == pool._parent:
            pool.shutdown(wait=True, cancel_futures=True)


