"""Persistent workers (``tasks_per_child=None`` or ``N``): the parent's side.

The wire protocol and the worker's own loop live in ``worker_loop``.  Here: choosing a
worker, forking one, sending it tasks (up to ``DEPTH`` queued, so it never waits for the
parent between two), reading its completion notices, and what a dying worker leaves behind:
its running task ended (its outcome is read like any other), its queued ones never started
and go back to the front of the queue.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from .dispatcher import (
    START_ERRORS,
    Dispatcher,
    Process,
    Run,
    fork_with_pipes,
    read_available,
    start_failure,
)
from .manager import Manager
from .reaper import Exit
from .tasks import Work
from .worker_loop import DEPTH, encode_task, flush_outbox, run_worker

__all__ = ["PersistentWorkers", "Worker"]

_U32 = struct.Struct("<I")


@dataclass(eq=False)
class Worker(Process):
    """The parent's view of one persistent worker."""

    task_w: int = -1
    done_r: int = -1
    slots: list[int] = field(default_factory=list)  # its free arena slots
    sent: int = 0
    inflight: collections.deque[Run] = field(default_factory=collections.deque)
    pending_bytes: bytes = b""
    outbox: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def running_task(self) -> Run | None:
        return self.inflight[0] if self.inflight else None

    def queue(self, message: bytes) -> None:
        """Add one task to the outbox; :meth:`flush` writes it."""
        self.outbox += _U32.pack(len(message))
        self.outbox += message

    def flush(self) -> bool:
        """Write queued bytes without blocking; True if some are left.  A worker that is
        gone drops them (its exit settles its tasks)."""
        return flush_outbox(self.task_w, self.outbox)

    def read_notices(self) -> list[int]:
        """The slots whose outcomes completed, from what the done pipe holds now."""
        data = read_available(self.done_r, self.pending_bytes)
        whole = len(data) - len(data) % _U32.size
        self.pending_bytes = data[whole:]
        return [slot for (slot,) in _U32.iter_unpack(data[:whole])]

    def stop(self) -> None:
        """Send the empty message and close the task pipe: the worker ends after its
        current tasks.  The message, not the EOF, is what it counts on: a process forked
        since (another pool's worker, a user's child) may hold a copy of the write end."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):  # full (it ends at EOF then) or gone
                if not self.outbox:
                    os.write(self.task_w, _U32.pack(0))
            os.close(self.task_w)

    def close(self) -> None:
        self.stop()
        os.close(self.done_r)


class PersistentWorkers(Dispatcher):
    """The dispatcher of persistent-worker mode."""

    def __init__(self, manager: Manager) -> None:
        super().__init__(manager)
        self.workers: dict[int, Worker] = {}
        self.by_fd: dict[int, Worker] = {}

    def _has_room(self, worker: Worker) -> bool:
        limit = self.manager.options.tasks_per_child
        return (not worker.closed and worker.terminated_at is None
                and len(worker.inflight) < DEPTH and (limit is None or worker.sent < limit))

    def start_work(self) -> None:
        manager = self.manager
        touched: dict[int, Worker] = {}
        try:
            # Unlocked peek: a stale answer is corrected by next_startable, and work
            # submitted after it wakes the manager at once.
            while manager.pending and manager.abort_signal is None:
                try:
                    worker = self._pick_worker()
                except START_ERRORS as exc:  # no worker exists and none was forked
                    failed = manager.next_startable(0)
                    if failed is None:
                        return
                    # Nobody could ever run it: it fails, the pool lives, the next one
                    # tries again.
                    manager.fail_before_start(failed, start_failure(exc))
                    continue
                if worker is None:
                    return
                work = manager.next_startable(0)
                if work is None:
                    return
                if self._send(worker, work):
                    touched[worker.pid] = worker
        finally:
            # One write per worker per round, however many tasks it was given.
            for worker in touched.values():
                if worker.flush():
                    manager.watch.add_writer(worker.task_w)  # the rest when it drains

    def _pick_worker(self) -> Worker | None:
        """An idle worker, else a new one while below max_workers (and the load allows),
        else the least busy worker with room; None when all are full.  Raises OSError
        (fork refused) or the Warning a filter made an error (see Manager.before_fork)
        when no worker exists and none could be forked."""
        least_busy: Worker | None = None
        for worker in self.workers.values():
            if self._has_room(worker):
                if not worker.inflight:
                    return worker
                if least_busy is None or len(worker.inflight) < len(least_busy.inflight):
                    least_busy = worker
        manager = self.manager
        if len(self.workers) < manager.options.max_workers and (
                not self.workers or manager.load_allows_fork()):
            try:
                return self._fork_worker()
            except START_ERRORS:  # no process, or a check refused: ours will do
                if not self.workers:
                    raise
        return least_busy

    def _fork_worker(self) -> Worker:
        manager = self.manager
        options = manager.options
        others = [fd for w in self.workers.values() for fd in (w.task_w, w.done_r)
                  if not w.closed]
        pid, (task_r, task_w), (done_r, done_w) = fork_with_pipes(manager)
        if pid == 0:  # the worker: never returns
            os.close(task_w)
            os.close(done_r)
            run_worker(manager.parent, task_r, done_w, manager.arena, options.tasks_per_child,
                       options.initializer, options.initargs, others, manager.child_setup)
        os.close(task_r)
        os.close(done_w)
        os.set_blocking(done_r, False)
        os.set_blocking(task_w, False)  # a full pipe must never stall the manager
        slots = [manager.free_slots.pop() for _ in range(DEPTH)]
        worker = Worker(pid, task_w=task_w, done_r=done_r, slots=slots)
        self.workers[pid] = worker
        self.by_fd[done_r] = worker
        manager.watch.add(pid)
        manager.watch.add_reader(done_r)
        return worker

    def _send(self, worker: Worker, work: Work) -> bool:
        """Queue ``work`` on ``worker``; True if queued (the caller flushes the pipe)."""
        manager = self.manager
        run = manager.new_run(work, worker.slots, worker.pid)
        work.future.record.pid = worker.pid
        try:
            message = encode_task(run.slot, run.spill, work.fn, work.args, work.kwargs)
        except Exception as exc:  # the call cannot be pickled: it fails here and now
            worker.slots.append(run.slot)
            manager.fail_before_start(work, exc)
            return False
        if not worker.inflight:
            manager.start_clock(run)
        worker.inflight.append(run)
        worker.sent += 1
        worker.queue(message)
        return True

    def on_events(self, readable: list[int], writable: list[int], exits: list[Exit]) -> None:
        for fd in readable:
            worker = self.by_fd.get(fd)
            if worker is not None:
                self._on_notices(worker)
        for fd in writable:
            self._flush(fd)
        for exited in exits:
            self._on_exit(exited)

    def _on_notices(self, worker: Worker) -> None:
        manager = self.manager
        for slot in worker.read_notices():
            run = worker.inflight.popleft()
            if run.slot != slot:  # pragma: no cover - a protocol bug, never silent
                raise RuntimeError(f"worker {worker.pid} completed slot {slot}, "
                                   f"expected {run.slot}")
            if worker.inflight:
                manager.start_clock(worker.inflight[0])
            manager.finish(run, None)

    def _flush(self, fd: int) -> None:
        """The task pipe ``fd`` can take more: write what its worker still has queued."""
        for worker in self.workers.values():
            if worker.task_w == fd and not worker.closed:
                if not worker.flush():
                    self.manager.watch.remove_writer(fd)
                return
        self.manager.watch.remove_writer(fd)

    def _on_exit(self, exited: Exit) -> None:
        manager = self.manager
        worker = self.workers.pop(exited.pid)
        self._on_notices(worker)  # what it finished before dying counts
        manager.watch.remove_writer(worker.task_w)
        manager.watch.remove_reader(worker.done_r)
        del self.by_fd[worker.done_r]
        worker.close()
        runs = list(worker.inflight)
        worker.inflight.clear()
        queued = runs[1:]
        head: Run | None = runs[0] if runs else None
        if (head is not None and worker.terminated_at is not None and not head.timed_out
                and manager.abort_signal is None):
            # The task that timed out finished just before the kill landed: the one now at
            # the head was killed for nothing, so it runs again like the queued ones.
            head, queued = None, runs
        for run in reversed(queued):  # never started: back to the front, in order
            manager.requeue(run)
        if head is not None:
            # Its usage covers every task the worker ran: not this task's own.
            manager.finish(head, Exit(exited.pid, exited.exitcode, exited.signal, 0, 0.0, 0.0))
        manager.free_slots.extend(worker.slots)

    def processes(self) -> Iterable[Process]:
        return list(self.workers.values())

    def pids(self) -> list[int]:
        return list(self.workers)

    def in_flight(self) -> list[Run]:
        return [run for worker in self.workers.values() for run in worker.inflight]

    def wind_down(self) -> bool:
        for worker in self.workers.values():
            if not worker.inflight:
                worker.stop()  # EOF on its task pipe: it exits
        return not self.workers

    def close(self) -> None:
        for worker in self.workers.values():  # only when the constructor failed midway
            worker.close()
