"""Who this process is, in a form that survives pid reuse.

A *token* packs a pid with the low 32 bits of the process start time (clock ticks since
boot, field 22 of ``/proc/PID/stat``) into one unsigned 64-bit word.  Robust mutexes store
the holder's token in shared memory; a waiter decides the holder is dead when no live
process has that pid *and* that start time, so a recycled pid is never mistaken for the
holder.  The token is computed once per process and recomputed in a forked child.
"""

from __future__ import annotations

import os

from .procfs import stat_fields

__all__ = ["ProcessIdentity", "IDENTITY", "process_alive", "token_alive", "token_pid"]

_PID_MASK = 0xFFFFFFFF


def _start_time(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks, or None if it is gone or a zombie."""
    try:
        fields = stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X", "x"):
        return None  # a zombie holds nothing any more
    return int(fields[19])


def _make_token(pid: int) -> int:
    start = _start_time(pid) or 0
    return ((start & _PID_MASK) << 32) | pid


class ProcessIdentity:
    """The current process's pid and token; refreshed in a child after every ``fork``."""

    __slots__ = ("pid", "token")

    def __init__(self) -> None:
        self.pid = 0
        self.token = 0
        self.refresh()

    def refresh(self) -> None:
        self.pid = os.getpid()
        self.token = _make_token(self.pid)


IDENTITY = ProcessIdentity()
os.register_at_fork(after_in_child=IDENTITY.refresh)


def token_pid(token: int) -> int:
    """The pid packed in ``token``."""
    return token & _PID_MASK


def token_alive(token: int) -> bool:
    """True if the process that wrote ``token`` still runs (and is not a zombie)."""
    start = _start_time(token & _PID_MASK)
    return start is not None and (start & _PID_MASK) == token >> 32


def process_alive(pid: int) -> bool:
    """True if ``pid`` names a running, non-zombie process."""
    return _start_time(pid) is not None
