"""Nothing a service started survives it.

Three mechanisms, because each covers what the others cannot:

- **Subreaper.**  The supervisor sets ``PR_SET_CHILD_SUBREAPER``: a process that a worker
  starts and orphans (a double fork, a worker that died first) becomes the supervisor's
  child instead of init's, so it is reaped and it can be found at stop.
- **Parent-death signal.**  Every worker asks for SIGKILL when the supervisor dies
  (``PR_SET_PDEATHSIG``), even by SIGKILL.
- **The sentinel.**  The parent-death signal is not inherited by the worker's own children,
  so when the supervisor is SIGKILLed something else must end them.  At start the supervisor
  forks a small sentinel process that leads a new process group; every worker joins that
  group, and so, unless they leave it, does everything the workers start.  The sentinel
  blocks reading a pipe whose only writer is the supervisor: when the supervisor ends, however
  it ends, the read returns end-of-file and the sentinel SIGKILLs its whole group, itself
  included.  A process that calls ``setsid`` or ``setpgid`` leaves the group and is out of
  the sentinel's reach (the subreaper still finds it while the supervisor lives).

At a normal stop :func:`sweep` terminates every remaining descendant found through /proc
(TERM, a grace, then KILL), then lets the sentinel kill its group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass

from .._os.libc import prctl
from .._os.procfs import stat_fields

__all__ = ["Sentinel", "descendants", "reap_any", "set_subreaper", "start_sentinel", "sweep"]

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def set_subreaper(on: bool) -> bool:
    """Make this process a child subreaper (or stop being one); returns the previous
    setting.  Raises OSError if the kernel refuses."""
    previous = ctypes.c_int(0)
    prctl(_PR_GET_CHILD_SUBREAPER, ctypes.addressof(previous))
    prctl(_PR_SET_CHILD_SUBREAPER, int(on))
    return bool(previous.value)


@dataclass
class Sentinel:
    """The sentinel's pid (also its process group) and the write end of its pipe."""

    pid: int
    pipe: int

    def release(self) -> None:
        """Close the pipe: the sentinel kills its group and exits.  Harmless twice."""
        if self.pipe >= 0:
            os.close(self.pipe)
            self.pipe = -1


def start_sentinel() -> Sentinel:
    """Fork the sentinel (see the module docstring).  Raises OSError if fork fails."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sentinel
        try:
            os.close(write_end)
            os.setpgid(0, 0)
            # Only the pipe ends it: INT and TERM ignored; the supervisor's other signals
            # stay blocked, as they were at the fork (only SIGKILL could end it besides).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.set_wakeup_fd(-1)
            while os.read(read_end, 1):
                pass
            os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(read_end)
    with contextlib.suppress(OSError):  # the sentinel does it too: the first one wins
        os.setpgid(pid, pid)
    return Sentinel(pid, write_end)


def descendants(root: int) -> list[int]:
    """Pids of every live process below ``root``, found through /proc (zombies excluded)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(int(entry))
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def reap_any() -> list[tuple[int, int]]:
    """Reap every child that has ended, without blocking: ``[(pid, wait status)]``."""
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        ended.append((pid, status))
    return ended


def _signal_all(pids: list[int], signum: int) -> None:
    """Signal each of ``pids`` that is still the process we listed.  Between the /proc walk
    and the kill, a grandchild can be reaped by its own parent and its pid reused, so each
    is pinned with a pidfd first and checked to still descend from us (its parent is us or
    another listed process) before the signal goes through the pidfd."""
    family = {os.getpid(), *pids}
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if int(stat_fields(pid)[1]) in family:
                signal.pidfd_send_signal(pidfd, signum)
        except (OSError, IndexError, ValueError):
            pass  # gone since: nothing to signal
        finally:
            os.close(pidfd)


def sweep(sentinel: Sentinel | None, grace: float) -> None:
    """At stop: TERM every descendant but the sentinel, wait up to ``grace`` seconds for
    them, KILL what is left, release the sentinel and reap every child.  Bounded:
    everything is SIGKILLed after ``grace``."""
    me = os.getpid()
    spare = {sentinel.pid} if sentinel is not None else set()

    def targets() -> list[int]:
        return [pid for pid in descendants(me) if pid not in spare]

    left = targets()
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        reap_any()
        left = targets()
        if left:
            time.sleep(0.01)  # polling /proc: a grandchild cannot be waited for
    # Until nothing is left: a process may fork while we kill its parent.
    for _ in range(100):
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        _wait_children(0.2)
        left = targets()
    if sentinel is not None:
        sentinel.release()
    _wait_children(5.0)


def _wait_children(limit: float) -> None:
    """Block reaping children until none is left or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        reap_any()
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
        time.sleep(0.005)
