"""A task's bookkeeping: its future, its record, and how a failure becomes an exception."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

from ..errors import ChildCrashedError, RemoteTraceback, TaskTimeoutError
from .reaper import Exit

__all__ = ["StreamTask", "TaskFuture", "TaskRecord", "Work", "apply_chunk", "chunks", "drop",
           "kill", "task_failure"]


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

    def lock_free_within(self, timeout: float) -> bool:
        """True if the lock every Future method takes could be had within ``timeout``
        seconds (it is let go at once); False if another thread held it all along."""
        # ``_condition`` is Future's own (CPython, since 3.2): every public method takes it.
        if not self._condition.acquire(timeout=timeout):
            return False
        self._condition.release()
        return True


class StreamTask:
    """A task of a stream (``imap_unordered``): the few Future methods the manager calls,
    without a condition variable or callbacks; its ending goes straight to the stream's
    queue as ``(task, ok, value)``.  Only the manager thread resolves it; the stream's own
    thread only cancels it, when the stream is closed early."""

    __slots__ = ("_claim", "_sink", "_state", "record")

    def __init__(self, task_id: int, sink: queue.SimpleQueue[tuple[StreamTask, bool, Any]]
                 ) -> None:
        self.record = TaskRecord(task_id)
        self._sink = sink
        self._state = "pending"
        # Starting and cancelling each take the one token; list.pop is atomic under the
        # GIL, so exactly one of them wins even when they race (a resumable batch relies
        # on it: a task it cancelled must never have run).
        self._claim = [True]

    def running(self) -> bool:
        return self._state == "running"

    def done(self) -> bool:
        return self._state in ("finished", "cancelled")

    def set_running_or_notify_cancel(self) -> bool:
        try:
            self._claim.pop()
        except IndexError:  # cancelled first
            return False
        self._state = "running"
        return True

    def cancel(self) -> bool:
        # A cancel that loses the race to the manager's start returns False: the task runs
        # and its ending lands in the sink (read or not by the stream).
        try:
            self._claim.pop()
        except IndexError:
            return self._state == "cancelled"
        self._state = "cancelled"
        self.record.outcome = "cancelled"
        # The stream learns of it as of any ending (a pool stopped under it).
        self._sink.put((self, False, CancelledError("the task was cancelled")))
        return True

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def set_result(self, value: Any) -> None:
        self._state = "finished"
        self._sink.put((self, True, value))

    def set_exception(self, error: BaseException) -> None:
        self._state = "finished"
        self._sink.put((self, False, error))


@dataclass(eq=False)  # identity: deque.remove must not compare calls field by field
class Work:
    """One submitted call and its future (a TaskFuture, or a StreamTask)."""

    future: TaskFuture | StreamTask
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def task_failure(work: Work, exited: Exit | None, outcome: tuple[int, Any] | None,
                 timed_out: bool, timeout: float | None) -> BaseException:
    """The exception a failed task's future gets; sets ``record.outcome``."""
    record = work.future.record
    pid = exited.pid if exited is not None else record.pid
    if timed_out:
        record.outcome = "timeout"
        return TaskTimeoutError(
            f"task {record.task_id} ran past {timeout} s; its process {pid} "
            f"was terminated", limit=f"timeout={timeout}")
    if outcome is not None:
        record.outcome = "exception"
        exc, text_repr, text = outcome[1]
        if exc is None:
            exc = ChildCrashedError(f"task raised an unpicklable exception: {text_repr}",
                                    pid=pid)
        exc.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
        return exc  # type: ignore[no-any-return]
    record.outcome = "crash"
    if exited is None:
        return ChildCrashedError(f"task {record.task_id}: process {pid} handed back "
                                 "no outcome", pid=pid)
    if exited.signal is not None:
        how = f"was killed by signal {exited.signal} ({signal_name(exited.signal)})"
    else:
        how = f"exited with status {exited.exitcode} without handing back an outcome"
    return ChildCrashedError(f"task {record.task_id}: process {exited.pid} {how}",
                             pid=exited.pid, exitcode=exited.exitcode,
                             signal=exited.signal)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; real-time and unknown signals too (``SIGRTMIN+6``, ``SIG99``)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"SIG{signum}"


def chunks(items: Iterable[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive chunks of ``size``.  A ``range`` is cut into ranges (a few
    bytes each to pickle, however many items), a list or tuple into slices (faster than
    taking items one by one); anything else into lists, lazily."""
    if isinstance(items, (range, list, tuple)):
        for start in range(0, len(items), size):
            yield items[start:start + size]
        return
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def apply_chunk(fn: Callable[..., Any], chunk: Iterable[Any], star: bool = False) -> list[Any]:
    """Run ``fn`` over a chunk of items, or of argument tuples with ``star`` (module level,
    so it pickles); ``map`` loops in C."""
    return list(itertools.starmap(fn, chunk) if star else map(fn, chunk))


def drop(work: Work) -> None:
    """Cancel a task that will not run; one already running gets CancelledError."""
    future = work.future
    if not future.done():
        future.record.outcome = "cancelled"
    if not future.cancel() and not future.done():
        future.set_exception(CancelledError("the pool was stopped before this task ended"))


def kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
