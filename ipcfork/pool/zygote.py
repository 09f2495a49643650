"""ForkPool's zygote mode (``zygote=True``), as a mixin: the parent's side of ``_zygote``.

The zygote is forked when the pool is made.  The parent sends it each task (pickled), learns
the pid of the child it forked and, once that child has exited and the zygote has reaped it,
its exit status and resource usage; the outcome itself is in the pool's arena as in plain
fork-per-task mode.  Timeouts and stops go through the zygote too (it signals only children
it has not reaped yet, so a recycled pid is never hit).  If the zygote dies, its children die
with it (parent-death signal); their tasks fail as crashes and a new zygote is forked from
the parent for the work that remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from .core import PoolCore
from .reaper import Exit
from .tasks import Running, Work
from .transfer import outcome_name
from .worker_loop import encode_task, flush_outbox
from .zygote_loop import kill_command, parse_events, run_zygote, task_command

__all__ = ["ZygoteDispatch"]


class ZygoteDispatch(PoolCore):
    """The zygote half of ForkPool."""

    _zygote_pid: int | None
    _zygote_cmd: int
    _zygote_events: int
    _zygote_rest: bytes
    _zygote_outbox: bytearray
    _zruns: dict[int, Running]

    def _start_zygote(self) -> None:
        """Fork the zygote now, from the calling thread."""
        cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
        event_r, event_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the zygote: never returns
            os.close(cmd_w)
            os.close(event_r)
            run_zygote(self._parent, cmd_r, event_w, self._arena, self._initializer,
                       self._initargs, self._child_setup)
        os.close(cmd_r)
        os.close(event_w)
        os.set_blocking(event_r, False)
        os.set_blocking(cmd_w, False)  # a full pipe must never stall the manager
        self._zygote_outbox = bytearray()
        self._zygote_pid, self._zygote_cmd, self._zygote_events = pid, cmd_w, event_r
        self._zygote_rest = b""
        self._watch.add(pid)
        self._watch.add_reader(event_r)

    def _zygote_dispatch(self) -> None:
        while (work := self._next_startable(len(self._zruns))) is not None:
            if self._zygote_pid is None:
                self._start_zygote()  # the previous one died: fork a new one from here
            self._zygote_send(work)

    def _zygote_send(self, work: Work) -> None:
        record = work.future.record
        record.attempts += 1
        slot = self._free_slots.pop()
        spill = outcome_name(self._parent, self._tag, record.task_id, record.attempts)
        try:
            message = task_command(encode_task(slot, spill, work.fn, work.args, work.kwargs))
        except Exception as exc:  # the call cannot be pickled: it fails here and now
            self._free_slots.append(slot)
            record.outcome = "exception"
            work.future.set_exception(exc)
            return
        self._arena.prepare(slot)
        started = time.monotonic()
        deadline = None if self.timeout is None else started + self.timeout
        self._zruns[slot] = Running(work, 0, slot, spill, started, deadline)
        self._zygote_write(message)

    def _zygote_write(self, frame: bytes) -> None:
        """Queue a frame for the zygote; what the pipe cannot take now goes when it drains
        (a dead zygote's exit settles its tasks)."""
        if self._zygote_cmd < 0:
            return
        self._zygote_outbox += frame
        self._zygote_flush()

    def _zygote_flush(self) -> None:
        if self._zygote_cmd < 0:
            return
        if flush_outbox(self._zygote_cmd, self._zygote_outbox):
            self._watch.add_writer(self._zygote_cmd)
        else:
            self._watch.remove_writer(self._zygote_cmd)

    def _zygote_signal(self, run: Running, signum: int) -> None:
        self._zygote_write(kill_command(run.slot, signum))

    def _on_zygote_events(self) -> None:
        chunks = [self._zygote_rest]
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._zygote_events, 1 << 16):
                chunks.append(chunk)
        events, self._zygote_rest = parse_events(b"".join(chunks))
        for event in events:
            run = self._zruns.get(event.slot)
            if run is None:
                continue
            if event.exit is None:  # started
                run.pid = run.work.future.record.pid = event.pid
                continue
            del self._zruns[event.slot]
            self._zygote_settle(run, event.exit)

    def _zygote_settle(self, run: Running, ended: Exit) -> None:
        record = run.work.future.record
        record.pid = ended.pid
        record.exitcode, record.signal = ended.exitcode, ended.signal
        record.wall_time = time.monotonic() - run.started
        record.maxrss_kib, record.utime, record.stime = ended.maxrss_kib, ended.utime, \
            ended.stime
        outcome, load_error = self._read_slot(run.slot, run.spill)
        self._free_slots.append(run.slot)
        self._settle(run.work, outcome, load_error, exited=ended, timed_out=run.timed_out)

    def _on_zygote_exit(self, exited: Exit) -> None:
        """The zygote ended: its children went with it; their tasks failed as crashes."""
        self._on_zygote_events()
        self._watch.remove_reader(self._zygote_events)
        os.close(self._zygote_events)
        self._close_zygote_commands()
        self._zygote_pid = None
        runs, self._zruns = list(self._zruns.values()), {}
        for run in runs:
            gone = Exit(run.pid or exited.pid, None, signal.SIGKILL, 0, 0.0, 0.0)
            self._zygote_settle(run, gone)

    def _zygote_timeouts(self, now: float) -> None:
        for run in self._zruns.values():
            if run.terminated_at is not None:
                if now >= run.terminated_at + self.grace:
                    self._zygote_signal(run, signal.SIGKILL)
            elif run.deadline is not None and now >= run.deadline:
                run.terminated_at = now
                run.timed_out = True
                self._zygote_signal(run, signal.SIGTERM)

    def _zygote_finish(self) -> bool:
        """With nothing left to run: close the command pipe (the zygote then exits);
        True once it has."""
        if self._zygote_pid is not None and not self._zruns and not self._zygote_outbox:
            self._close_zygote_commands()
        return self._zygote_pid is None

    def _close_zygote_commands(self) -> None:
        if self._zygote_cmd >= 0:
            flush_outbox(self._zygote_cmd, self._zygote_outbox)  # best effort, no waiting
            self._watch.remove_writer(self._zygote_cmd)
            os.close(self._zygote_cmd)
            self._zygote_cmd = -1
