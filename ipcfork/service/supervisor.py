"""The supervisor loop: signal handlers only queue the signal (and wake the loop through
``signal.set_wakeup_fd``); the loop acts, in this order, on every turn:

1. the queued signals (stop, reload, scale, status);
2. the children that ended (``waitpid(-1, WNOHANG)``: workers, the sentinel, orphans that the
   subreaper inherited), and a replacement scheduled, with backoff, for a worker that was not
   asked to end;
3. heartbeats (a silent worker is terminated) and kill deadlines (TERM, then one KILL);
4. forks that are due (missing slots, replacements whose backoff has passed);
5. notify messages (READY, STATUS, WATCHDOG);

then it sleeps in ``select`` until the next deadline or signal.  One thread, no locks: all
state belongs to the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import CrashLoopError
from ..pool.dispatcher import read_available
from ..pool.tasks import signal_name
from . import descendants
from .notify import Notifier, monotonic_usec
from .pidfile import Pidfile
from .report import status_lines
from .restarts import FIRST_DELAY, RestartPolicy
from .status import (
    DRAINING,
    FREE,
    GENERATION,
    HEARTBEAT,
    MAX_WORKERS,
    RELOADING,
    RESTARTS,
    SERVICE_RUNNING,
    STATE,
    STOPPING,
    WANTED,
    StatusTable,
)
from .worker import WorkerContext, run_worker

if TYPE_CHECKING:
    from .service import Service

__all__ = ["FAST_GRACE", "Supervisor"]

_log = logging.getLogger("ipcfork.service")
FAST_GRACE = 0.5  # SIGINT/SIGQUIT: workers get this long to unwind before SIGKILL
SWEEP_GRACE = 1.0  # descendants still alive at stop: TERM, this long, then KILL
MAX_SLEEP = 1.0
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
            signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


@dataclass
class Proc:
    """One worker process as the supervisor tracks it."""

    pid: int
    slot: int
    generation: int
    row: int
    started: float
    draining: bool = False
    kill_at: float | None = None
    killed: bool = False
    reason: str | None = None  # why the supervisor terminated it, when it did


def describe_status(status: int) -> str:
    """A wait status in words: ``exited with status 3`` or ``killed by SIGKILL``."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Runs one :class:`~ipcfork.Service` in this process (see the module docstring)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.count = service.workers
        self.generation = 1
        self.workers: dict[int, Proc] = {}
        self.pending: dict[int, float] = {}  # slot -> when its replacement is due
        self.policy = RestartPolicy(service.max_restarts, service.restart_window or 60.0)
        self.stop_mode: str | None = None
        self.failure: str | None = None
        self.signals: list[int] = []
        self.ready = False
        self.last_status = ""
        self.notifier = Notifier({})  # a no-op until run() makes the real one
        self.next_watchdog = time.monotonic()
        self.pid = os.getpid()
        self.table: StatusTable
        self.sentinel: descendants.Sentinel | None = None
        self.pidfile: Pidfile | None = None
        self.wake_r = self.wake_w = -1
        self.drain = service.drain_timeout or 0.0

    # -- set up and tear down -----------------------------------------------------------

    def run(self) -> None:
        """See :meth:`Service.run`.

        The handled signals are blocked while the supervisor sets itself up and tears itself
        down, so a signal in those windows can neither kill it half-made (leaving a pidfile
        or a status table) nor reach a handler that is gone; one that arrives during the
        teardown is dropped (the service is stopping anyway).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Service.run() must be called from the main thread "
                               "(it installs signal handlers)")
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            self._run_with_signals_blocked()
        finally:
            while signal.sigtimedwait(_HANDLED, 0) is not None:
                pass  # arrived during the teardown: the stop they could ask for is done
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if self.failure is not None:
            raise CrashLoopError(self.failure)
        _log.info("service %s stopped", self.service.name)

    def _run_with_signals_blocked(self) -> None:
        with contextlib.ExitStack() as undo:
            # Registered first, so undone last: the handlers stay until everything else is.
            for signum in _HANDLED:
                undo.callback(signal.signal, signum, signal.signal(signum, self._on_signal))
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            undo.callback(os.close, self.wake_r)
            undo.callback(os.close, self.wake_w)
            previous_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
            undo.callback(signal.set_wakeup_fd, previous_wakeup)
            was_reaper = descendants.set_subreaper(True)
            undo.callback(descendants.set_subreaper, was_reaper)
            if self.service.pidfile is not None:
                self.pidfile = Pidfile(self.service.pidfile,
                                       allow_foreign=self.service.allow_foreign_pidfile)
                stale = self.pidfile.acquire()
                undo.callback(self.pidfile.release)
                if stale is not None:
                    self._forget_dead_service(stale)
            self.notifier = Notifier()
            undo.callback(self.notifier.close)
            self.table = StatusTable.create(self.service.name)
            undo.callback(self.table.close)
            self.sentinel = descendants.start_sentinel()
            undo.callback(self._sweep)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            undo.callback(signal.pthread_sigmask, signal.SIG_BLOCK, _HANDLED)  # undone first
            self._loop()

    def _forget_dead_service(self, pid: int) -> None:
        """A stale pidfile named ``pid``: remove that service's status table, unless the pid
        is alive (reused by another process, perhaps another service that owns it)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        else:
            alive = True
        _log.warning("took over pidfile %s: pid %d, written in it, no longer holds its lock%s",
                     self.service.pidfile, pid, " (that pid now belongs to another process)"
                     if alive else "")
        if not alive:
            with contextlib.suppress(OSError):  # not ours to remove: leave it to clean
                StatusTable.remove(pid)

    def _sweep(self) -> None:
        if self.stop_mode is None:  # _begin_stop has not said it
            self.notifier.send("STOPPING=1")
        descendants.sweep(self.sentinel, SWEEP_GRACE if self.stop_mode == "graceful"
                          else FAST_GRACE / 2)
        self.sentinel = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)  # the loop acts on it; a handler does nothing else

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        self.table.set_header(WANTED, self.count)
        self.table.set_header(GENERATION, self.generation)
        self.notifier.send(f"STATUS=starting {self.count} workers")
        _log.info("service %s starting %d workers (pid %d)", self.service.name, self.count,
                  self.pid)
        while True:
            now = time.monotonic()
            self._take_signals(now)
            self._reap(now)
            if self.stop_mode is not None and not self.workers:
                return
            if self.stop_mode is None:
                self._check_heartbeats(now)
                self._start_due(now)
                self._announce()
            self._enforce_deadlines(now)
            self._watchdog(now)
            self._sleep(self._next_event(now) - time.monotonic())

    def _sleep(self, seconds: float) -> None:
        if self.signals:
            return
        with contextlib.suppress(InterruptedError):
            select.select([self.wake_r], [], [], max(0.0, min(seconds, MAX_SLEEP)))
        read_available(self.wake_r)  # emptied: the next select waits again

    def _next_event(self, now: float) -> float:
        times = [now + MAX_SLEEP, *self.pending.values()]
        times += [p.kill_at for p in self.workers.values() if p.kill_at and not p.killed]
        timeout = self.service.heartbeat_timeout
        if timeout is not None and self.stop_mode is None:
            for proc in self.workers.values():
                if not proc.draining and proc.kill_at is None:
                    times.append(self.table.word(proc.row, HEARTBEAT) / 1e9 + timeout)
        if self.notifier.watchdog_interval is not None:
            times.append(self.next_watchdog)
        return min(times)

    # -- signals --------------------------------------------------------------------------

    def _take_signals(self, now: float) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGTERM:
                self._begin_stop("graceful", now)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self._begin_stop("fast", now)
            elif signum == signal.SIGUSR1:
                for line in status_lines(self.table.summary()):
                    _log.info("%s", line)
            elif self.stop_mode is not None:
                continue  # stopping: no reload, no scaling
            elif signum == signal.SIGHUP:
                self._reload(now)
            elif signum == signal.SIGTTIN:
                self._scale(+1, now)
            elif signum == signal.SIGTTOU:
                self._scale(-1, now)

    def _begin_stop(self, mode: str, now: float) -> None:
        if self.stop_mode == "fast" or (mode == "graceful" and self.stop_mode is not None):
            return
        self.stop_mode = mode
        self.pending.clear()
        self.notifier.send("STOPPING=1")
        self.table.set_header(STATE, STOPPING)
        grace = self.drain if mode == "graceful" else FAST_GRACE
        how = signal.SIGTERM if mode == "graceful" else signal.SIGINT
        _log.info("%s stop: %d workers to end within %.1f s", mode, len(self.workers), grace)
        for proc in self.workers.values():
            self._drain(proc, now, grace, how)

    def _drain(self, proc: Proc, now: float, grace: float, how: int) -> None:
        """Ask ``proc`` to end (its ``ctx.stopping`` turns True) and kill it after ``grace``."""
        proc.draining = True
        self.table.set_state(proc.row, DRAINING)
        deadline = now + grace
        proc.kill_at = deadline if proc.kill_at is None else min(proc.kill_at, deadline)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, how)

    def _refuse_reload(self, reason: str) -> None:
        why = f"reload refused, generation {self.generation} keeps running: {reason}"
        _log.error("%s", why)
        self.notifier.send(f"STATUS={why}")  # `systemctl status` shows it

    def _reload(self, now: float) -> None:
        free = self.table.free_rows()
        if free < self.count:
            self._refuse_reload(f"the status table has room for {free} more workers, a new "
                                f"generation needs {self.count}; reload again once the "
                                "draining workers have ended")
            return
        try:
            self.service.reloaded_work()  # the next forks run it
        except Exception as exc:
            self._refuse_reload(f"{type(exc).__name__}: {exc}")
            return
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                           "STATUS=reloading")
        self.table.set_header(STATE, RELOADING)
        old = [proc for proc in self.workers.values() if not proc.draining]
        self.generation += 1
        self.table.set_header(GENERATION, self.generation)
        self.pending.clear()
        self.ready = False
        _log.info("reload: starting generation %d, then draining %d workers of generation %d",
                  self.generation, len(old), self.generation - 1)
        for slot in range(self.count):
            self._spawn(slot, now)
        for proc in old:
            self._drain(proc, now, self.drain, signal.SIGTERM)

    def _scale(self, step: int, now: float) -> None:
        wanted = min(max(1, self.count + step), MAX_WORKERS)
        self.last_status = ""  # answer every request with a STATUS=, even a refused one
        if wanted == self.count:
            _log.info("workers stay at %d (the limits are 1 and %d)", self.count, MAX_WORKERS)
            return
        if wanted < self.count:
            self.pending.pop(wanted, None)
            for proc in list(self.workers.values()):
                if proc.slot == wanted and not proc.draining:
                    self._drain(proc, now, self.drain, signal.SIGTERM)
        self.count = wanted
        self.table.set_header(WANTED, wanted)
        _log.info("workers: %d", wanted)

    # -- children -------------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        for pid, status in descendants.reap_any():
            proc = self.workers.pop(pid, None)
            if proc is None:
                if self.sentinel is not None and pid == self.sentinel.pid:
                    _log.warning("the sentinel (pid %d) died: processes that workers start "
                                 "will outlive a SIGKILLed supervisor", pid)
                    self.sentinel.release()
                    self.sentinel = None
                continue  # an orphan the subreaper inherited
            self.table.set_state(proc.row, FREE)
            how = proc.reason or describe_status(status)
            if proc.draining or self.stop_mode is not None:
                _log.info("worker %d (pid %d, generation %d) ended: %s", proc.slot, pid,
                          proc.generation, describe_status(status))
                continue
            self._replace(proc, how, now)

    def _replace(self, proc: Proc, how: str, now: float) -> None:
        delay = self.policy.record_exit(proc.slot, now - proc.started, now)
        self.table.set_header(RESTARTS, self.policy.total)
        if delay is None:
            self.failure = (f"crash loop: {self.policy.reason}; the last: worker {proc.slot} "
                            f"(pid {proc.pid}) {how}")
            _log.error("%s; stopping the service", self.failure)
            self._begin_stop("fast", now)
            return
        _log.warning("worker %d (pid %d) %s; replacing it in %.1f s", proc.slot, proc.pid,
                     how, delay)
        self.pending[proc.slot] = now + delay

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.service.heartbeat_timeout
        if timeout is None:
            return
        for proc in self.workers.values():
            if proc.draining or proc.kill_at is not None:
                continue
            silent = now - self.table.word(proc.row, HEARTBEAT) / 1e9
            if silent > timeout:
                proc.reason = (f"was silent for {silent:.1f} s (heartbeat_timeout={timeout:g} "
                               "s) and was terminated")
                _log.warning("worker %d (pid %d) %s", proc.slot, proc.pid, proc.reason)
                proc.kill_at = now + min(timeout, self.drain, 5.0)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def _enforce_deadlines(self, now: float) -> None:
        for proc in self.workers.values():
            if proc.kill_at is not None and not proc.killed and now >= proc.kill_at:
                proc.killed = True
                _log.warning("worker %d (pid %d) did not end in time: SIGKILL", proc.slot,
                             proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    def _running_slots(self) -> set[int]:
        """Slots with a worker of the current generation that was not asked to end."""
        return {p.slot for p in self.workers.values()
                if p.generation == self.generation and not p.draining}

    def _start_due(self, now: float) -> None:
        running = self._running_slots()
        for slot in range(self.count):
            if slot not in running and self.pending.get(slot, now) <= now:
                self._spawn(slot, now)

    def _spawn(self, slot: int, now: float) -> None:
        restarts = self.policy.by_slot.get(slot, 0)
        try:
            row = self.table.claim(slot, self.generation, restarts)
        except LookupError:  # only after TTIN beyond the room that draining workers left
            _log.error("no room in the status table for worker %d; trying again in %.1f s",
                       slot, FIRST_DELAY)
            self.pending[slot] = now + FIRST_DELAY
            return
        # Blocked across the fork: the child must not run the supervisor's handlers (a
        # signal meant for the new worker would be swallowed); it unblocks them once its
        # own handlers are in place, and what arrived meanwhile is delivered then.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            self.table.set_state(row, FREE)
            failed = Proc(0, slot, self.generation, row, now)
            self.pending.pop(slot, None)
            self._replace(failed, f"could not be forked ({exc})", now)
            return
        if pid == 0:
            context = WorkerContext(slot, self.generation, self.table, row)
            group = self.sentinel.pid if self.sentinel is not None else None
            keep_out = (self.wake_r, self.wake_w,
                        self.sentinel.pipe if self.sentinel is not None else -1,
                        self.pidfile.fd if self.pidfile and self.pidfile.fd is not None else -1)
            run_worker(self.service.work, context, supervisor=self.pid, group=group,
                       close_fds=tuple(fd for fd in keep_out if fd >= 0), blocked=_HANDLED)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        if self.sentinel is not None:
            with contextlib.suppress(OSError):
                os.setpgid(pid, self.sentinel.pid)  # the worker does it too: no race
        self.table.set_pid(row, pid)
        self.workers[pid] = Proc(pid, slot, self.generation, row, now)
        self.pending.pop(slot, None)
        _log.info("worker %d started (pid %d, generation %d)", slot, pid, self.generation)

    # -- telling the world ----------------------------------------------------------------

    def _announce(self) -> None:
        running = self._running_slots()
        complete = all(slot in running for slot in range(self.count))
        status = (f"STATUS={len(running)} of {self.count} workers running, "
                  f"generation {self.generation}")
        if complete and not self.ready:
            self.ready = True
            self.table.set_header(STATE, SERVICE_RUNNING)
            self.notifier.send("READY=1", status)
            self.last_status = status
            _log.info("ready: %d workers, generation %d", self.count, self.generation)
        elif status != self.last_status:
            self.notifier.send(status)
            self.last_status = status

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self.next_watchdog:
            self.notifier.send("WATCHDOG=1")
            self.next_watchdog = now + interval
