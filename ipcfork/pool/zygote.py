"""Zygote mode (``zygote=True``): the parent's side of ``zygote_loop``.

The zygote is forked when the pool is made.  The parent sends it each task (pickled) and
learns the pid of the child it forked and, once the zygote has reaped that child, its exit
status and resource usage; the outcome itself is in the pool's arena as in fork-per-task
mode.  Timeouts and stops go through the zygote too (it signals only children it has not
reaped yet, so a recycled pid is never hit).  A fork the zygote could not make while none of
its children ran comes back as a failure of that task.  If the zygote dies, its children die
with it (parent-death signal); their tasks end as crashes and a new zygote is forked from the
parent for the work that remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

from .._os.translate import fork_error
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
from .worker_loop import encode_task, flush_outbox
from .zygote_loop import QUIT_COMMAND, kill_command, parse_events, run_zygote, task_command

__all__ = ["Zygote"]


class Zygote(Dispatcher):
    """The dispatcher of zygote mode; forks the zygote as the manager thread starts,
    before the pool's constructor returns (before this process grows threads or a large
    heap)."""

    def __init__(self, manager: Manager) -> None:
        super().__init__(manager)
        self.pid: int | None = None
        self.commands = self.events = -1
        self.rest = b""
        self.outbox = bytearray()
        self.runs: dict[int, Run] = {}  # by slot

    def prepare(self) -> None:
        self._start_zygote()  # now: before this process grows threads or a big heap

    def _start_zygote(self) -> None:
        """Fork the zygote.  Raises OSError when the fork is refused, or the warning a
        filter made an error (see Manager.before_fork)."""
        manager = self.manager
        options = manager.options
        pid, (cmd_r, cmd_w), (event_r, event_w) = fork_with_pipes(manager)
        if pid == 0:  # the zygote: never returns
            os.close(cmd_w)
            os.close(event_r)
            run_zygote(manager.parent, cmd_r, event_w, manager.arena, options.initializer,
                       options.initargs, manager.child_setup)
        os.close(cmd_r)
        os.close(event_w)
        os.set_blocking(event_r, False)
        os.set_blocking(cmd_w, False)  # a full pipe must never stall the manager
        self.outbox = bytearray()
        self.pid, self.commands, self.events, self.rest = pid, cmd_w, event_r, b""
        manager.watch.add(pid)
        manager.watch.add_reader(event_r)

    def start_work(self) -> None:
        manager = self.manager
        while (work := manager.next_startable(len(self.runs))) is not None:
            if self.pid is None:
                try:
                    self._start_zygote()  # the previous one died: fork a new one from here
                except START_ERRORS as exc:
                    manager.fail_before_start(work, start_failure(exc))  # the next tries again
                    continue
            self._send(work)

    def _send(self, work: Work) -> None:
        manager = self.manager
        run = manager.new_run(work, manager.free_slots)
        try:
            message = task_command(encode_task(run.slot, run.spill, work.fn, work.args,
                                               work.kwargs))
        except Exception as exc:  # the call cannot be pickled: it fails here and now
            manager.free_slots.append(run.slot)
            manager.fail_before_start(work, exc)
            return
        manager.start_clock(run)
        self.runs[run.slot] = run
        self._write(message)

    def _write(self, frame: bytes) -> None:
        """Queue a frame for the zygote; what the pipe cannot take now goes when it drains
        (a dead zygote's exit settles its tasks)."""
        if self.commands < 0:
            return
        self.outbox += frame
        self._flush()

    def _flush(self) -> None:
        if self.commands < 0:
            return
        if flush_outbox(self.commands, self.outbox):
            self.manager.watch.add_writer(self.commands)
        else:
            self.manager.watch.remove_writer(self.commands)

    def on_events(self, readable: list[int], writable: list[int], exits: list[Exit]) -> None:
        if self.events in readable:
            self._read_events()
        if self.commands in writable:
            self._flush()
        for exited in exits:
            if exited.pid == self.pid:
                self._on_zygote_exit()

    def _read_events(self) -> None:
        events, self.rest = parse_events(read_available(self.events, self.rest))
        manager = self.manager
        for event in events:
            run = self.runs.get(event.slot)
            if run is None:
                continue
            if event.kind == "S":  # started
                run.pid = run.work.future.record.pid = event.pid  # type: ignore[union-attr]
                continue
            del self.runs[event.slot]
            if event.kind == "F":  # the zygote could not fork and had no child to wait for
                manager.free_slots.append(run.slot)
                error = OSError(event.pid, os.strerror(event.pid))  # pid carries the errno
                manager.fail_before_start(run.work, fork_error(error))  # type: ignore[arg-type]
                continue
            manager.finish(run, event.exit)

    def _on_zygote_exit(self) -> None:
        """The zygote ended: its children went with it; their tasks ended as crashes."""
        self._read_events()
        manager = self.manager
        manager.watch.remove_reader(self.events)
        os.close(self.events)
        self.events = -1
        self._close_commands()
        zygote, self.pid = self.pid or 0, None
        runs, self.runs = list(self.runs.values()), {}
        for run in runs:
            manager.finish(run, Exit(run.pid or zygote, None, signal.SIGKILL, 0, 0.0, 0.0))

    def _close_commands(self) -> None:
        if self.commands >= 0:
            self.outbox += QUIT_COMMAND  # the EOF alone may never come (see zygote_loop)
            flush_outbox(self.commands, self.outbox)  # best effort, no waiting
            self.outbox.clear()
            self.manager.watch.remove_writer(self.commands)
            os.close(self.commands)
            self.commands = -1

    def processes(self) -> Iterable[Process]:
        return list(self.runs.values())

    def signal(self, process: Process, signum: int) -> None:
        assert isinstance(process, Run)
        self._write(kill_command(process.slot, signum))

    def pids(self) -> list[int]:
        return [] if self.pid is None else [self.pid]

    def in_flight(self) -> list[Run]:
        return list(self.runs.values())

    def wind_down(self) -> bool:
        """With nothing left to run: close the command pipe (the zygote then exits); True
        once it has."""
        if self.pid is not None and not self.runs and not self.outbox:
            self._close_commands()
        return self.pid is None

    def stop_accepting(self) -> None:
        self._close_commands()  # the zygote exits once its children are reaped

    def close(self) -> None:
        """When the pool's resources go: normally the zygote is gone by then; if the pool
        failed to start or its manager failed, stop and reap it here."""
        self._close_commands()
        if self.events >= 0:
            os.close(self.events)
            self.events = -1
        if self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = None

