"""The manager: one background thread per pool, one loop for every mode.

Each round the loop lets the mode's dispatcher start queued work, sleeps in ``poll`` until a
child ends, a descriptor of the mode is ready, a deadline falls due or a submit wakes it,
then hands what happened to the dispatcher and enforces timeouts.  What follows an ending is
the same in every mode and lives only here: :meth:`Manager.finish` reads the outcome and
settles the future (result, the task's exception, a crash, a timeout, or another attempt).
Timeouts are the same too (``deadlines``): SIGTERM when a task's deadline passes, one
SIGKILL ``grace`` seconds later, then nothing more but waiting for the exit.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .._os.hugepages import HugepageReport, collapse_hugepages
from .._os.identity import IDENTITY
from ..errors import IpcforkError
from .deadlines import enforce, next_deadline, terminate
from .dispatcher import Dispatcher, Run
from .forksafety import ForkSafety
from .logs import LogChannel
from .options import PoolOptions
from .reaper import ChildWatch, Exit
from .stopping import StopHandoff
from .tasks import StreamTask, TaskFuture, Work, drop, kill, task_failure
from .transfer import EXCEPTION, OutcomeArena, discard_outcome, outcome_name

__all__ = ["Manager"]

_LOG = logging.getLogger("ipcfork.pool")
_LOAD_RECHECK = 0.5  # seconds between load checks while forks are held back


class _ClosedWatch:
    """Stands in for a closed ChildWatch so late wake-ups are harmless."""

    def wake(self) -> None:
        pass


def _resolve(future: TaskFuture | StreamTask, ok: bool, value: Any) -> None:
    """Resolve ``future``.  Its done-callbacks are user code run right here, in the manager
    thread: Future logs the Exceptions they raise; a BaseException (SystemExit, ...) is
    logged the same way instead of ending the manager with other tasks unresolved."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except BaseException:
        _LOG.exception("a done-callback of task %s raised", future.record.task_id)


RUNNING: set[Manager] = set()  # managers whose loop runs, held strongly (see executor)


class Manager:
    """The pool's runtime state and its manager thread (see the module docstring)."""

    def __init__(self, options: PoolOptions, make_dispatcher: Callable[[Manager], Dispatcher],
                 slots: int) -> None:
        self.options = options
        self.parent = IDENTITY.pid
        self.tag = os.urandom(4).hex()
        self.pending: collections.deque[Work] = collections.deque()
        # No lock: every step a user thread takes (submit, shutdown, abort) is a single
        # atomic deque operation or attribute store under the GIL, and the manager thread
        # owns the rest.  A lock held by the main thread could be left held for good by a
        # KeyboardInterrupt that lands between acquire and the ``with`` block, and would
        # deadlock the pool's own signal handler (it runs in the main thread).
        self.shutdown_requested = False
        self.abort_signal: int | None = None
        self.kill_now = False
        self.stop = StopHandoff()
        self.free_slots = list(range(slots))
        self._ids = itertools.count(1)
        self._asleep = True  # a submit wakes the manager only when it sleeps
        self._new_work = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._creator: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.handed_out: Work | None = None
        self._cancelling = False  # shutdown is cancelling queued tasks: not finished yet
        self._hugepages_tried = False
        self.hugepages_report: HugepageReport | None = None
        self.safety = ForkSafety(options.fork_safety_checks)
        self.watch: ChildWatch = ChildWatch()
        self.logs: LogChannel | None = None
        self.dispatcher: Dispatcher | None = None
        try:
            self.arena = OutcomeArena(slots)
            if options.forward_logs:
                self.logs = LogChannel()
                self.watch.add_reader(self.logs.fd)
            self.dispatcher = make_dispatcher(self)
        except BaseException:
            self.release()
            raise

    # -- called from user threads -----------------------------------------------------------

    def start(self) -> None:
        """Start the manager thread (once, from the pool's constructor: a signal that stops
        the pool then always finds a running manager to wait for)."""
        self._creator = threading.current_thread()
        self._thread = threading.Thread(target=self._loop, name="ipcfork-pool", daemon=True)
        RUNNING.add(self)  # until the loop ends: a pool dropped unshut still finishes
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> TaskFuture:
        """Queue a call; raises RuntimeError after shutdown."""
        future = TaskFuture(next(self._ids))
        self.enqueue(Work(future, fn, args, kwargs))
        return future

    def stream_task(self, sink: queue.SimpleQueue[tuple[StreamTask, bool, Any]],
                    fn: Callable[..., Any], *args: Any) -> StreamTask:
        """Queue a call whose ending goes to ``sink`` (see ``StreamTask``); raises
        RuntimeError after shutdown."""
        task = StreamTask(next(self._ids), sink)
        self.enqueue(Work(task, fn, args, {}))
        return task

    def enqueue(self, work: Work) -> None:
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self.pending.append(work)
        if self._stopping():  # a shutdown raced with us: take the task back
            with contextlib.suppress(ValueError):  # ValueError: the manager has it already
                self.pending.remove(work)
                raise RuntimeError("cannot schedule new futures after shutdown")
        # Store, then load; the manager stores _asleep, then loads _new_work: under the
        # GIL one of us sees the other's store, so a sleeping manager is always woken.
        self._new_work = True
        if self._asleep:  # a busy manager sees the new task on its next round anyway
            self.watch.wake()

    def _stopping(self) -> bool:
        return self.shutdown_requested

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Refuse new work; optionally cancel what has not started; optionally wait."""
        self.shutdown_requested = True
        if cancel_futures:
            self._cancelling = True  # the queue is briefly empty: the manager must not stop
            try:
                pending = self.take_pending()
                # Retried tasks are running already: they stay queued and run again.
                self.pending.extendleft(reversed([w for w in pending if w.future.running()]))
                for work in pending:
                    if not work.future.running():
                        work.future.cancel()  # callbacks are user code: after the put-back
            finally:
                self._cancelling = False
        self.watch.wake()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()  # a Ctrl-C here still reaches the handler: children get killed
        if thread is None:
            self.release()

    def abort(self, signum: int, kill_now: bool) -> None:
        """Stop at once (from the signal handler): no new forks; children terminated and
        reaped by the manager, and their futures resolved here (see ``stopping``), before
        this returns.  A second call while the first waits only sets ``kill_now``.

        The wait is bounded: if the children are not reaped in ``grace`` + 5 s, every known
        child is SIGKILLed and we return; the manager reaps them afterwards.
        """
        thread = self._thread
        # A second signal finds the first one's handler waiting: it only sets kill_now.
        waits = (thread is not None and thread is not threading.current_thread()
                 and self.stop.begin_wait())
        self.kill_now = self.kill_now or kill_now
        self.abort_signal = signum
        self.shutdown_requested = True
        self.watch.wake()
        if not waits:
            return
        try:
            # The manager resolves no future meanwhile (see ``stopping``), but it may still
            # need another lock the interrupted code holds (a logging handler's): bounded.
            if not self.stop.reaped.wait(self.options.grace + 5.0):
                for pid in self._known_pids():
                    kill(pid, signal.SIGKILL)
        finally:
            self.stop.end_wait()

    def _known_pids(self) -> list[int]:
        dispatcher = self.dispatcher
        for _ in range(3):  # the manager may change the tables while we copy them
            with contextlib.suppress(RuntimeError):
                return dispatcher.pids() if dispatcher is not None else []
        return []

    # -- the manager thread ---------------------------------------------------------------

    def _loop(self) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        try:
            # The mode's own processes are forked from this thread, which lives as long as
            # the pool: a child's parent-death signal fires when the thread that forked it
            # ends, and the constructor's thread may end long before the pool.
            dispatcher.prepare()
        except BaseException as exc:
            self._start_error = exc
            RUNNING.discard(self)
            self.release()
            self.stop.reaped.set()
            return
        finally:
            self._started.set()
        try:
            while True:
                if self.abort_signal is None:
                    dispatcher.start_work()
                self._asleep = True
                new_work, self._new_work = self._new_work, False
                # Work submitted while we were busy did not wake us: look again at once.
                timeout = 0.0 if new_work else self._next_wakeup(time.monotonic())
                self._round(timeout)
                if self.abort_signal is not None:
                    self._abort()
                    return
                if self._finished():
                    return
        except BaseException as exc:  # a bug (or worse): fail every future loudly
            self._fail_everything(exc)
            raise
        finally:
            RUNNING.discard(self)
            self.release()
            self.stop.reaped.set()

    def _round(self, timeout: float | None) -> None:
        """Wait up to ``timeout``, then handle what happened and enforce timeouts."""
        exits = self.watch.wait(timeout)
        self._asleep = False
        # Log records first, so a task's records reach the handlers before its future
        # resolves.  Whenever something finished: a child queues its records before it
        # posts a notice or exits (poll may have looked at the log socket just before).
        readable = self.watch.ready
        if self.logs is not None and (exits or readable):
            self.logs.drain()
        assert self.dispatcher is not None
        self.dispatcher.on_events(readable, self.watch.writable, exits)
        enforce(self.dispatcher, self.options.grace, time.monotonic())

    def _finished(self) -> bool:
        """True once shut down with nothing left; lets idle processes go on the way."""
        if not self.shutdown_requested or self.pending or self._cancelling:
            return False
        assert self.dispatcher is not None
        return self.dispatcher.wind_down()

    # -- what the dispatchers use ---------------------------------------------------------

    def load_allows_fork(self) -> bool:
        limit = self.options.max_load
        return limit is None or os.getloadavg()[0] <= limit

    def next_startable(self, busy: int) -> Work | None:
        """The next queued task to start while ``busy`` tasks run, or None when the cap,
        the load guard (which never stops the first) or a stop says wait.  Cancelled
        futures are skipped; a retried task's future is running already and goes ahead."""
        while True:
            if busy >= self.options.max_workers or self.abort_signal is not None:
                return None
            if busy and self.pending and not self.load_allows_fork():
                return None  # forks resume when the load drops or a child ends
            try:
                work = self.pending.popleft()
            except IndexError:
                return None
            if not self.stop.free(work.future):  # a stop began: it will drop the task
                self.pending.appendleft(work)
                return None
            if work.future.running() or work.future.set_running_or_notify_cancel():
                # Until its dispatcher makes a run of it the task is nowhere else: a
                # manager that fails meanwhile must still fail it (see _fail_everything).
                self.handed_out = work
                return work
            work.future.record.outcome = "cancelled"

    def new_run(self, work: Work, home: list[int], pid: int = 0) -> Run:
        """A new attempt of ``work``, in a slot taken from ``home`` (emptied for it)."""
        self.handed_out = None  # in a run from now on (and never kept alive by us)
        record = work.future.record
        record.attempts += 1
        slot = home.pop()
        self.arena.prepare(slot)
        spill = outcome_name(self.parent, self.tag, record.task_id, record.attempts)
        return Run(pid, work=work, slot=slot, spill=spill, home=home)

    def start_clock(self, run: Run) -> None:
        run.started = time.monotonic()
        if self.options.timeout is not None:
            run.deadline = run.started + self.options.timeout

    def before_fork(self) -> Exception | None:
        """Runs before every fork the pool's own process makes: the fork-safety checks
        (threads, inherited connections), and huge pages once if asked for.

        Returns the warning a warnings filter turned into an error (ForkSafetyWarning,
        HugepageWarning), or the error huge pages met (no /proc): the caller fails the
        task it was forking for with it, as the manager thread has no caller to raise to.
        Each kind is raised once per pool."""
        own = [] if self.logs is None else list(self.logs.fds)
        # The constructor's thread only waits for us while the pool starts: not a risk.
        idle = [] if self._started.is_set() or self._creator is None else [self._creator]
        try:
            self.safety.before_fork(own, idle)
            if self.options.hugepages and not self._hugepages_tried:
                self._hugepages_tried = True
                self.hugepages_report = collapse_hugepages()
        except (Warning, IpcforkError) as error:  # IpcforkError: no /proc for huge pages
            return error
        return None

    def child_setup(self) -> None:
        """Runs in every process the pool forks, right after the fork."""
        if self.logs is not None:
            self.logs.install_in_child()

    def requeue(self, run: Run) -> None:
        """``run`` never started (its worker died first): back to the front of the queue,
        not counted as an attempt."""
        assert run.work is not None and run.home is not None
        discard_outcome(run.spill)
        run.home.append(run.slot)
        run.work.future.record.attempts -= 1
        self.pending.appendleft(run.work)

    def fail_before_start(self, work: Work, error: BaseException) -> None:
        """``work`` cannot run at all (its call would not pickle, no process could be
        forked): its future fails now.  The future may be running already (a retry)."""
        self.handed_out = None
        future = work.future
        def fail() -> None:
            if future.running() or future.set_running_or_notify_cancel():
                future.record.outcome = "exception" if not isinstance(error, OSError) else "crash"
                _resolve(future, False, error)

        self.stop.settle(future, fail)

    def finish(self, run: Run, exited: Exit | None) -> None:
        """The one path from an ending to an outcome, for every mode.

        ``exited``: how the task's process ended (fork per task, zygote), or None when a
        persistent worker reported the slot complete; for a worker that died, its exit.
        Reads the slot, returns it to its home, then resolves the future or queues the
        task again if retries remain.
        """
        assert run.work is not None and run.home is not None
        work = run.work
        record = work.future.record
        if exited is not None:
            record.pid = exited.pid
            record.exitcode, record.signal = exited.exitcode, exited.signal
            if exited.maxrss_kib:  # a worker's usage covers many tasks: not recorded
                record.maxrss_kib, record.utime, record.stime = (
                    exited.maxrss_kib, exited.utime, exited.stime)
        if run.started is not None:
            record.wall_time = time.monotonic() - run.started
        load_error: BaseException | None = None
        try:
            outcome = self.arena.read(run.slot)
        except Exception as exc:  # the result failed to load in the parent
            outcome, load_error = None, exc
        if outcome is None:
            discard_outcome(run.spill)  # a child that died mid-spill may have left it
        run.home.append(run.slot)
        # A complete result wins even if the deadline passed meanwhile: the work was done.
        if outcome is not None and outcome[0] != EXCEPTION:
            record.outcome = "result"
            self.stop.settle(work.future, functools.partial(_resolve, work.future, True,
                                                            outcome[1]))
            return
        if load_error is not None:
            record.outcome = "exception"
            error = load_error
        else:
            error = task_failure(work, exited, outcome, run.timed_out, self.options.timeout)
        if record.attempts <= self.options.retries and self.abort_signal is None:
            self.pending.appendleft(work)  # run it again, before newer tasks
            return
        self.stop.settle(work.future, functools.partial(_resolve, work.future, False, error))

    def _next_wakeup(self, now: float) -> float | None:
        assert self.dispatcher is not None
        waits = []
        if self.options.timeout is not None or self.abort_signal is not None:
            due = next_deadline(self.dispatcher, self.options.grace, now)
            if due is not None:
                waits.append(due)
        if self.options.max_load is not None and self.pending and not self.load_allows_fork():
            waits.append(_LOAD_RECHECK)
        return min(waits) if waits else None

    # -- stopping -------------------------------------------------------------------------

    def _abort(self) -> None:
        """Stop on a signal: cancel what has not started, TERM (KILL with ``kill_now``)
        the rest, and reap them; KILL whatever is left after the grace period."""
        dispatcher = self.dispatcher
        assert dispatcher is not None
        self._drop_pending()
        now = time.monotonic()
        for process in dispatcher.processes():
            if self.kill_now:
                process.kill_sent = True
                dispatcher.signal(process, signal.SIGKILL)
            elif process.terminated_at is None:
                terminate(dispatcher, process, now)
        dispatcher.stop_accepting()
        deadline = now + self.options.grace
        killed_all = False
        while dispatcher.pids():
            remaining = deadline - time.monotonic()
            if not killed_all and (remaining <= 0 or self.kill_now):
                killed_all = True  # once; a zygote's children die with it
                for pid in dispatcher.pids():
                    kill(pid, signal.SIGKILL)
            self._round(None if killed_all else remaining)
            self._drop_pending()  # requeued by a dying worker: dropped too
        self.stop.reaped.set()

    def take_pending(self) -> list[Work]:
        """Empty the queue and return what it held (one popleft at a time: a concurrent
        submit or requeue is either taken or stays queued, never lost)."""
        taken = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self.pending.popleft())
        return taken

    def _drop_pending(self) -> None:
        self.shutdown_requested = True
        for work in self.take_pending():
            self.stop.settle(work.future, functools.partial(drop, work))

    def _fail_everything(self, exc: BaseException) -> None:
        """The manager hit a bug: refuse new work, kill the children, fail every future."""
        self.shutdown_requested = True
        works = self.take_pending()
        if self.handed_out is not None:
            works.append(self.handed_out)
        dispatcher = self.dispatcher
        if dispatcher is not None:
            works += [run.work for run in dispatcher.in_flight() if run.work is not None]
            for pid in dispatcher.pids():
                kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        for work in works:
            if not work.future.done():
                work.future.set_exception(exc)

    def release(self) -> None:
        """Close the watcher, arena, log channel and the mode's resources (by the manager
        as it exits, or by the constructor when a later step failed).  Idempotent."""
        dispatcher, self.dispatcher = self.dispatcher, None
        try:
            if dispatcher is not None:
                dispatcher.close()  # while the watch is still there to unregister from
        finally:
            self._release_rest()

    def _release_rest(self) -> None:
        watch, self.watch = self.watch, _ClosedWatch()  # type: ignore[assignment]
        logs, self.logs = self.logs, None
        if isinstance(watch, ChildWatch):
            watch.close()
        if hasattr(self, "arena"):
            self.arena.close()
        if logs is not None:
            logs.close()
