"""What the manager asks of a mode: the ``Dispatcher`` interface, and the two records every
mode shares, ``Run`` (one attempt of one task) and ``Process`` (a process the manager may
have to terminate).

A dispatcher knows how its mode starts work and how it learns that work ended; nothing else.
Everything that follows an ending (reading the outcome, retrying, failing the future) and
everything about timeouts (TERM, grace, one KILL) is the manager's, written once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._os.translate import fork_error
from ..errors import IpcforkError
from .reaper import Exit
from .tasks import Work, kill

if TYPE_CHECKING:
    from .manager import Manager

__all__ = ["START_ERRORS", "Dispatcher", "Process", "Run", "fork_with_pipes", "read_available",
           "start_failure"]

# What starting a helper process may raise that fails one task, not the pool: a refused
# fork, a warning a filter made an error, an ipcfork error (huge pages without /proc).
START_ERRORS = (OSError, Warning, IpcforkError)


@dataclass(eq=False)
class Process:
    """A process of ours the manager may terminate: SIGTERM once at ``terminated_at``, and
    SIGKILL once (``kill_sent``) if it still runs ``grace`` seconds later."""

    pid: int
    terminated_at: float | None = None
    kill_sent: bool = False

    def running_task(self) -> Run | None:
        """The task whose deadline this process answers for, if any."""
        return None


@dataclass(eq=False)
class Run(Process):
    """One attempt of one task: its slot in the outcome arena (returned to ``home`` when the
    attempt is over), the name its outcome may spill to, and its clock.

    In fork-per-task and zygote modes a run is also the process that runs it (``pid`` is the
    task's child; 0 until a zygote reports the child it forked)."""

    work: Work | None = None
    slot: int = -1
    spill: str = ""
    home: list[int] | None = None
    started: float | None = None
    deadline: float | None = None
    timed_out: bool = False

    def running_task(self) -> Run | None:
        return self


class Dispatcher:
    """One mode of ForkPool, driven by the manager thread (never by user threads)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def prepare(self) -> None:
        """Fork what the mode needs before any task (the zygote); runs first thing in the
        manager thread, and what it raises comes out of the pool's constructor."""

    def start_work(self) -> None:
        """Start as much queued work as the mode's capacity and the load guard allow."""
        raise NotImplementedError

    def on_events(self, readable: list[int], writable: list[int], exits: list[Exit]) -> None:
        """Descriptors of ours found readable or writable, and children of ours that ended
        (already reaped): learn which runs ended and hand each to ``manager.finish``."""
        raise NotImplementedError

    def processes(self) -> Iterable[Process]:
        """Every process the manager may have to time out or stop."""
        raise NotImplementedError

    def signal(self, process: Process, signum: int) -> None:
        """Deliver ``signum`` to ``process``: directly, unless the mode must go through
        a helper (the zygote)."""
        kill(process.pid, signum)

    def pids(self) -> list[int]:
        """Every live process of ours, for a last-resort SIGKILL."""
        raise NotImplementedError

    def in_flight(self) -> list[Run]:
        """Every run that has started and not ended."""
        raise NotImplementedError

    def wind_down(self) -> bool:
        """Nothing is left to run: let idle processes go; True once all of ours are gone."""
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """A stop began: tell helper processes no more work comes."""

    def close(self) -> None:
        """Release what the mode holds (called once, when the pool's resources go)."""


def read_available(fd: int, rest: bytes = b"") -> bytes:
    """``rest`` plus everything the non-blocking pipe ``fd`` holds now (b"" at EOF)."""
    chunks = [rest]
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def fork_with_pipes(manager: Manager) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Fork a helper process of the mode (a worker, the zygote) with two new pipes,
    ``(pid, (r1, w1), (r2, w2))``, after the manager's fork checks.  Raises OSError when
    the fork is refused (the pipes are closed again), or the warning a filter made an error
    (see Manager.before_fork)."""
    refused = manager.before_fork()
    if refused is not None:
        raise refused
    first, second = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        for fd in (*first, *second):
            os.close(fd)
        raise
    return pid, first, second


def start_failure(error: Exception) -> Exception:
    """The exception a task fails with when its process could not be started."""
    if isinstance(error, OSError) and not isinstance(error, IpcforkError):
        return fork_error(error)
    return error
