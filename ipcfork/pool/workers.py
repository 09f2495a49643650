"""ForkPool's persistent-worker mode (``tasks_per_child=None`` or ``N``), as a mixin.

The wire protocol and the worker's loop live in ``_workers``; this is the parent's side:
choosing a worker, forking one, sending a task, reading completion notices, and settling
what a dying worker leaves behind (its running task fails, its queued ones run elsewhere).
"""

from __future__ import annotations

import os
import time

from .._os.translate import fork_error
from .core import PoolCore
from .reaper import Exit
from .tasks import Work
from .transfer import discard_outcome, outcome_name
from .worker_loop import DEPTH, InFlight, Worker, encode_task, run_worker

__all__ = ["WorkerDispatch"]


class WorkerDispatch(PoolCore):
    """The persistent-worker half of ForkPool."""

    _workers: dict[int, Worker]
    _worker_by_fd: dict[int, Worker]

    def _has_room(self, worker: Worker) -> bool:
        return (not worker.closed and worker.terminated_at is None
                and len(worker.inflight) < DEPTH
                and (self.tasks_per_child is None or worker.sent < self.tasks_per_child))

    def _dispatch_to_workers(self) -> None:
        touched: dict[int, Worker] = {}
        try:
            while True:
                # Unlocked peek: a stale answer is corrected under the lock below, and work
                # submitted after it sets _new_work, which brings the manager back at once.
                if not self._pending or self._abort_signal is not None:
                    return
                worker = self._pick_worker()
                if worker is None:
                    return
                with self._lock:
                    if not self._pending:
                        return
                    work = self._pending.popleft()
                if not (work.future.running()
                        or work.future.set_running_or_notify_cancel()):
                    work.future.record.outcome = "cancelled"
                    continue
                if self._send(worker, work):
                    touched[worker.pid] = worker
        finally:
            # One write per worker per round, however many tasks it was given.
            for worker in touched.values():
                if worker.flush():
                    self._watch.add_writer(worker.task_w)  # the rest when the pipe drains

    def _pick_worker(self) -> Worker | None:
        """An idle worker, else a new one while below max_workers (and the load allows),
        else the least busy worker with room; None when all are full."""
        least_busy: Worker | None = None
        for worker in self._workers.values():
            if self._has_room(worker):
                if not worker.inflight:
                    return worker
                if least_busy is None or len(worker.inflight) < len(least_busy.inflight):
                    least_busy = worker
        if len(self._workers) < self.max_workers and (
                not self._workers or self._load_allows_fork()):
            try:
                return self._fork_worker()
            except OSError as exc:  # out of processes or memory
                if not self._workers:  # nobody could ever run the queue: fail its head
                    with self._lock:
                        work = self._pending.popleft() if self._pending else None
                    if work is not None and work.future.set_running_or_notify_cancel():
                        work.future.set_exception(fork_error(exc))
                return None
        return least_busy

    def _fork_worker(self) -> Worker:
        self._warn_about_threads()
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        others = [fd for w in self._workers.values() for fd in (w.task_w, w.done_r)
                  if not w.closed]
        try:
            pid = os.fork()
        except OSError:
            for fd in (task_r, task_w, done_r, done_w):
                os.close(fd)
            raise
        slots = [self._free_slots.pop() for _ in range(DEPTH)] if pid else []
        if pid == 0:  # the worker: never returns
            os.close(task_w)
            os.close(done_r)
            run_worker(self._parent, task_r, done_w, self._arena, self.tasks_per_child,
                       self._initializer, self._initargs, others, self._child_setup)
        os.close(task_r)
        os.close(done_w)
        os.set_blocking(done_r, False)
        os.set_blocking(task_w, False)  # a full pipe must never stall the manager
        worker = Worker(pid, task_w, done_r, slots)
        self._workers[pid] = worker
        self._worker_by_fd[done_r] = worker
        self._watch.add(pid)
        self._watch.add_reader(done_r)
        return worker

    def _send(self, worker: Worker, work: Work) -> bool:
        """Queue ``work`` on ``worker``; True if queued (the caller flushes the pipe)."""
        record = work.future.record
        record.attempts += 1
        record.pid = worker.pid
        slot = worker.slots.pop()
        spill = outcome_name(self._parent, self._tag, record.task_id, record.attempts)
        try:
            message = encode_task(slot, spill, work.fn, work.args, work.kwargs)
        except Exception as exc:  # the call cannot be pickled: it fails here and now
            worker.slots.append(slot)
            record.outcome = "exception"
            work.future.set_exception(exc)
            return False
        self._arena.prepare(slot)
        flight = InFlight(work, slot, spill)
        if not worker.inflight:
            self._start_clock(flight)
        worker.inflight.append(flight)
        worker.sent += 1
        worker.queue(message)
        return True

    def _start_clock(self, flight: InFlight) -> None:
        flight.started = time.monotonic()
        if self.timeout is not None:
            flight.deadline = flight.started + self.timeout

    def _on_notices(self, worker: Worker) -> None:
        for slot in worker.read_notices():
            flight = worker.inflight.popleft()
            if flight.slot != slot:  # pragma: no cover - a protocol bug, never silent
                raise RuntimeError(f"worker {worker.pid} completed slot {slot}, "
                                   f"expected {flight.slot}")
            outcome, load_error = self._read_slot(slot, flight.spill)
            worker.slots.append(slot)
            record = flight.work.future.record
            record.wall_time = time.monotonic() - (flight.started or time.monotonic())
            if worker.inflight:
                self._start_clock(worker.inflight[0])
            self._settle(flight.work, outcome, load_error, exited=None, timed_out=False)

    def _flush_worker(self, fd: int) -> None:
        """The task pipe ``fd`` can take more: write what its worker still has queued."""
        for worker in self._workers.values():
            if worker.task_w == fd and not worker.closed:
                if not worker.flush():
                    self._watch.remove_writer(fd)
                return
        self._watch.remove_writer(fd)

    def _on_worker_exit(self, exited: Exit) -> None:
        worker = self._workers.pop(exited.pid)
        self._on_notices(worker)  # what it finished before dying counts
        self._watch.remove_writer(worker.task_w)
        self._watch.remove_reader(worker.done_r)
        del self._worker_by_fd[worker.done_r]
        flights = list(worker.inflight)
        self._free_slots.extend(worker.slots + [f.slot for f in flights])
        worker.close()
        if not flights:
            return
        head: InFlight | None = flights[0]
        queued = flights[1:]
        if worker.timed_out is not None and head is not worker.timed_out:
            # The task that timed out finished just before the kill landed: the one now at
            # the head was killed for nothing, so it runs again like the queued ones.
            head, queued = None, flights
        with self._lock:
            for flight in reversed(queued):  # never started: back to the front, in order
                discard_outcome(flight.spill)
                flight.work.future.record.attempts -= 1
                self._pending.appendleft(flight.work)
        if head is None:
            return
        record = head.work.future.record
        record.exitcode, record.signal = exited.exitcode, exited.signal
        record.wall_time = time.monotonic() - (head.started or time.monotonic())
        discard_outcome(head.spill)
        self._settle(head.work, None, None, exited=exited,
                     timed_out=worker.timed_out is head)
