"""Fork per task (``tasks_per_child=1``, the default): the manager thread forks one child
per task, at most ``max_workers`` at a time, and learns of its end from the child's pidfd.

Nothing is pickled on the way in: the child runs the very callable the parent holds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from .._os.translate import fork_error
from .child import run_task_in_child
from .dispatcher import Dispatcher, Process, Run
from .manager import Manager
from .reaper import Exit
from .tasks import Work

__all__ = ["ForkPerTask"]


class ForkPerTask(Dispatcher):
    """The dispatcher of fork-per-task mode."""

    def __init__(self, manager: Manager) -> None:
        super().__init__(manager)
        self.running: dict[int, Run] = {}

    def start_work(self) -> None:
        manager = self.manager
        while (work := manager.next_startable(len(self.running))) is not None:
            if not self._fork(work):
                return  # out of processes for now: the next child's exit brings us back

    def _fork(self, work: Work) -> bool:
        """Fork a child for ``work``; False if the system is out of processes or memory
        while children of ours run (the task goes back to the front of the queue, to be
        forked when one of them has ended)."""
        manager = self.manager
        refused = manager.before_fork()
        if refused is not None:  # a warnings filter made a fork-safety warning an error
            manager.fail_before_start(work, refused)
            return True
        run = manager.new_run(work, manager.free_slots)
        arena, slot, spill = manager.arena, run.slot, run.spill

        def write(kind: int, payload: object) -> None:
            arena.write(slot, kind, payload, spill)

        options = manager.options
        manager.start_clock(run)
        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOMEM) and self.running:
                manager.requeue(run)  # not an attempt: it never ran
                return False
            # With no child of ours to wait for, nothing would free the resource: this
            # task fails, the pool lives.
            run.home.append(slot)  # type: ignore[union-attr]
            manager.fail_before_start(work, fork_error(exc))
            return True
        if pid == 0:  # the child: never returns
            run_task_in_child(manager.parent, write, work.fn, work.args, work.kwargs,
                              options.initializer, options.initargs, manager.child_setup)
        run.pid = work.future.record.pid = pid
        self.running[pid] = run
        manager.watch.add(pid)
        return True

    def on_events(self, readable: list[int], writable: list[int], exits: list[Exit]) -> None:
        if not exits:
            return
        manager = self.manager
        ended = [(self.running.pop(exited.pid), exited) for exited in exits]
        try:
            # Fork the replacements before reading large (spilled) outcomes: copying one
            # takes tens of milliseconds, and the next children run meanwhile (each has a
            # spare arena slot for this).  Not with retries: a failed task must run again
            # before newer ones.
            if not manager.options.retries and any(
                    manager.arena.spilled(run.slot) for run, _ in ended):
                self.start_work()
        finally:
            for run, exited in ended:
                manager.finish(run, exited)

    def processes(self) -> Iterable[Process]:
        return list(self.running.values())

    def pids(self) -> list[int]:
        return list(self.running)

    def in_flight(self) -> list[Run]:
        return list(self.running.values())

    def wind_down(self) -> bool:
        return not self.running
