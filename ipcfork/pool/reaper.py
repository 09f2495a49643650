"""Learning of child exits without polling: one pidfd per child, watched with ``poll``.

A pidfd becomes readable when its process exits; we then ``wait4`` it, which returns at once
with the exit status and the child's resource usage.  Unlike a SIGCHLD handler this needs no
signal disposition of ours (nothing to restore, no EINTR in the user's code), cannot lose a
child to signal coalescing (each child has its own descriptor), and, since the child is not
reaped until we call ``wait4``, its pid cannot be reused while we still hold it.  A pipe lets
other threads wake the watcher.  Linux >= 5.3 is required (``os.pidfd_open``).
"""

from __future__ import annotations

import contextlib
import os
import select
import weakref
from dataclasses import dataclass

__all__ = ["ChildWatch", "Exit"]


@dataclass(frozen=True)
class Exit:
    """How a child ended, with its resource usage from ``wait4``."""

    pid: int
    exitcode: int | None  # None when a signal ended it
    signal: int | None
    maxrss_kib: int
    utime: float
    stime: float


class ChildWatch:
    """Children to watch, and a way to wait for any of them (or a wake-up) to happen."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, int] = {}
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self.ready: list[int] = []  # reader descriptors found readable by the last wait
        self.writable: list[int] = []  # writer descriptors found writable by the last wait
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)

    def add(self, pid: int) -> None:
        """Watch child ``pid`` (it may already have exited)."""
        fd = os.pidfd_open(pid)  # close-on-exec already
        self._by_fd[fd] = pid
        self._poll.register(fd, select.POLLIN)

    def add_reader(self, fd: int) -> None:
        """Also wake :meth:`wait` when ``fd`` has data (or its writer closed it)."""
        self._readers.add(fd)
        self._poll.register(fd, select.POLLIN)

    def remove_reader(self, fd: int) -> None:
        self._readers.discard(fd)
        self._poll.unregister(fd)

    def add_writer(self, fd: int) -> None:
        """Also wake :meth:`wait` when ``fd`` can take more data (or its reader is gone)."""
        if fd not in self._writers:
            self._writers.add(fd)
            self._poll.register(fd, select.POLLOUT)

    def remove_writer(self, fd: int) -> None:
        if fd in self._writers:
            self._writers.discard(fd)
            self._poll.unregister(fd)

    def wake(self) -> None:
        """Make a pending or the next :meth:`wait` return (callable from any thread)."""
        # BlockingIOError: a wake-up is pending already.  BrokenPipeError: closed; the write
        # end stays open until this object goes, so a late wake never hits a reused fd.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake_w, b"!")

    def wait(self, timeout: float | None) -> list[Exit]:
        """Wait up to ``timeout`` seconds for exits or a wake-up; reap and return the exits."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = self._poll.poll(ms)  # PEP 475: retried across signals by Python
        exits = []
        self.ready = []
        self.writable = []
        for fd, _ in events:
            if fd in self._readers:
                self.ready.append(fd)
                continue
            if fd in self._writers:
                self.writable.append(fd)
                continue
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                continue
            pid = self._by_fd.pop(fd)
            self._poll.unregister(fd)
            os.close(fd)
            exits.append(reap(pid))
        return exits

    def close(self) -> None:
        """Stop watching; the remaining children are the caller's to reap."""
        for fd in self._by_fd:
            os.close(fd)
        self._by_fd.clear()
        os.close(self._wake_r)
        weakref.finalize(self, os.close, self._wake_w)


def reap(pid: int) -> Exit:
    """``wait4`` an exited (or exiting) child and decode its status.

    If someone else reaped it first (``os.wait()`` elsewhere, SIGCHLD set to SIG_IGN), the
    exit is unknown: exit code and signal are None.
    """
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:
        return Exit(pid=pid, exitcode=None, signal=None, maxrss_kib=0, utime=0.0, stime=0.0)
    exitcode = os.waitstatus_to_exitcode(status)
    return Exit(
        pid=pid,
        exitcode=exitcode if exitcode >= 0 else None,
        signal=-exitcode if exitcode < 0 else None,
        maxrss_kib=usage.ru_maxrss,
        utime=usage.ru_utime,
        stime=usage.ru_stime,
    )
