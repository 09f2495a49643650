"""A worker's side of the service: what it is handed (:class:`WorkerContext`) and how a
forked worker sets itself up, runs the user's function and ends.

A worker never returns into the supervisor's code: it ends in ``os._exit`` (0 when the
function returned, 1 when it raised), so no ``finally`` block or atexit handler of the
supervisor runs twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from ..pool.child import die_with_parent, end_child
from ..pool.dispatcher import read_available
from .status import DRAINING, ROW_STATE, StatusTable

__all__ = ["WorkerContext", "run_worker"]

_log = logging.getLogger("ipcfork.service")
EXIT_RAISED = 1
# Signals meant for the supervisor that must not kill a worker.  A Python handler rather
# than SIG_IGN: handlers fall back to the default at exec, an ignored signal would stay
# ignored in every program the worker runs.  SIGTTIN and SIGTTOU keep their default (stop):
# caught, a read of the terminal from the workers' background group would be retried for
# ever, each retry raising SIGTTIN again.
_SUPERVISOR_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class WorkerContext:
    """What the service's function receives in each worker.

    ``index``: the worker's slot (0 to workers - 1; a replacement takes the slot of the worker
    it replaces).  ``generation``: 1 at start, one more on each reload (SIGHUP).
    """

    def __init__(self, index: int, generation: int, table: StatusTable, row: int) -> None:
        self.index = index
        self.generation = generation
        self._table = table
        self._row = row
        self._stop_signalled = False
        self._wake_fd = -1  # the read end of the worker's signal wakeup pipe

    def __repr__(self) -> str:
        return (f"<WorkerContext index={self.index} generation={self.generation} "
                f"stopping={self.stopping}>")

    @property
    def stopping(self) -> bool:
        """True once a graceful stop, a reload or a scale-down asks this worker to finish
        its unit of work and return."""
        return self._stop_signalled or self._table.word(self._row, ROW_STATE) == DRAINING

    def heartbeat(self) -> None:
        """Say "alive and making progress": stores the time in this worker's word of shared
        memory (no system call, no file) and counts one unit done.  A worker silent for
        longer than the service's ``heartbeat_timeout`` is terminated and replaced.  Call
        it from the worker process itself (its word has one writer), not from a process
        the worker forked."""
        self._table.beat(self._row)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, or less when a stop begins; return
        :attr:`stopping`.  For idle workers: ``while not ctx.wait(5): poll_for_work()``
        stops within moments of a SIGTERM, where ``time.sleep(5)`` would finish its five
        seconds first.  Raises InvalidArgumentError for a negative or NaN timeout."""
        if not timeout >= 0:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(f"timeout must be >= 0, not {timeout!r}")
        deadline = time.monotonic() + timeout
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._wake_fd < 0:  # not in a worker set up by run_worker
                time.sleep(min(left, 0.05))
                continue
            # The TERM handler runs between bytecodes, but the C-level handler writes to the
            # wakeup pipe at once, so select returns as the signal lands (a plain sleep
            # would be resumed for its whole time by PEP 475).
            select.select([self._wake_fd], [], [], min(left, 1.0))
            read_available(self._wake_fd)  # emptied: the next select waits again
        return self.stopping

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signalled = True  # finish the unit in progress; do not interrupt it

    def _on_supervisor_signal(self, signum: int, frame: FrameType | None) -> None:
        pass


def _set_up(ctx: WorkerContext, supervisor: int, group: int | None,
            close_fds: tuple[int, ...]) -> None:
    die_with_parent(supervisor)
    if group is not None:
        # The supervisor does it too, whoever runs first wins; if the sentinel is gone, the
        # worker stays in the supervisor's group.
        with contextlib.suppress(OSError):
            os.setpgid(0, group)
    signal.set_wakeup_fd(-1)  # before closing the supervisor's pipe, whose number may be reused
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    ctx._wake_fd, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)  # for ctx.wait
    signal.signal(signal.SIGTERM, ctx._on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTTIN, signal.SIG_DFL)
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    for signum in _SUPERVISOR_SIGNALS:
        signal.signal(signum, ctx._on_supervisor_signal)
    os.environ.pop("NOTIFY_SOCKET", None)
    os.environ.pop("WATCHDOG_USEC", None)
    os.environ.pop("WATCHDOG_PID", None)


def run_worker(work: Callable[[WorkerContext], Any], ctx: WorkerContext, *, supervisor: int,
               group: int | None, close_fds: tuple[int, ...],
               blocked: tuple[int, ...] = ()) -> NoReturn:
    """In a freshly forked worker: die with the supervisor, join the service's process group,
    take the worker's signal handlers (TERM: finish the unit and return; INT: stop now),
    run ``work(ctx)`` and ``_exit``: 0 when it returned, 1 when it raised (the traceback is
    logged), or the status of a SystemExit.  ``blocked``: the signals the supervisor
    blocked across the fork, unblocked once the worker's own handlers are installed."""
    code = EXIT_RAISED
    try:
        _set_up(ctx, supervisor, group, close_fds)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)  # the fork was made with them
        work(ctx)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        _log.exception("worker %d (pid %d) raised", ctx.index, os.getpid())
    finally:
        end_child(code)
