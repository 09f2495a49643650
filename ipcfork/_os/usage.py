"""Who uses an IPC object right now, so ``ipcfork clean`` never removes one a live process
still uses, and ``ipcfork ls`` can say so.

What the kernel lets us see differs by kind:

* SysV shared memory: the number of attached processes (``nattch`` in /proc/sysvipc/shm).
  Exact.
* SysV semaphores: the kernel keeps no list of users.  A named set ipcfork made has PHP's
  layout, whose member 1 counts the processes using it (ipcfork and PHP add themselves with
  SEM_UNDO, so the kernel takes a dead user off): we count those, the processes blocked in
  a wait on a member (``semncnt`` + ``semzcnt``), and the process that made the last
  operation on each member (``sempid``) if it still runs.  On a one-member set (anonymous,
  or made by others) a process that only opened it, or used it before another process's
  operation, is not seen.
* SysV message queues: likewise the last sender and receiver (``lspid``, ``lrpid``).
* POSIX objects: every process's open descriptors (``/proc/PID/fd``) and mappings
  (``/proc/PID/maps``), matched by device and inode (glibc maps a new semaphore under a
  temporary file name, so names do not compare).  Exact for processes whose /proc entries
  we may read (all as root; our own uid's otherwise).

A pid the kernel has reused for an unrelated process may count as a user: the mistake
keeps an object, never removes one in use.
"""

from __future__ import annotations

import contextlib
import os

import posix_ipc

from .identity import process_alive
from .libc import sem_getval, sem_member_info
from .procfs import sysv_row

__all__ = ["PosixUsers", "Usage", "sysv_usage"]

Usage = tuple[tuple[int, ...], int]  # (live pids using it, processes attached/counted)

PHP_NSEMS = 3  # PHP's sem_get layout (see _sysv; not imported: _sysv imports the registry)


def _alive(pids: list[int]) -> tuple[int, ...]:
    me = os.getpid()
    return tuple(sorted({pid for pid in pids if pid > 0 and pid != me and process_alive(pid)}))


def sysv_usage(kind: str, ident: str) -> Usage:
    """``(live users, attached or counted)`` of SysV object ``ident`` (see the module
    docstring for what each kind reveals); ``((), 0)`` if it is gone or unreadable."""
    row = sysv_row(kind, ident)
    if row is None:
        return (), 0
    try:
        if kind == "shm":
            return (), int(row["nattch"])
        if kind == "queue":
            return _alive([int(row["lspid"]), int(row["lrpid"])]), 0
        pids, counted = [], 0
        nsems = int(row["nsems"])
        for member in range(nsems):
            info = sem_member_info(int(ident), member)
            if info is None:  # removed meanwhile
                return (), 0
            pid, ncnt, zcnt = info
            pids.append(pid)
            counted += ncnt + zcnt
        if nsems >= PHP_NSEMS:
            counted += sem_getval(int(ident), 1)  # the users PHP's layout counts
        return _alive(pids), counted
    except (OSError, KeyError, ValueError):  # removed meanwhile, or an unexpected table
        return (), 0


class PosixUsers:
    """Which live processes have a POSIX object open or mapped, from one scan of /proc
    (made on first use, so listings without POSIX objects read nothing)."""

    def __init__(self) -> None:
        self._index: dict[tuple[int, int], set[int]] | None = None

    def users(self, kind: str, name: str) -> tuple[int, ...]:
        """The live pids (other than ours) that have POSIX object ``name`` open or mapped;
        ``()`` if it is gone."""
        node = _posix_node(kind, name)
        if node is None:
            return ()
        if self._index is None:
            self._index = _scan_proc()
        return tuple(sorted(self._index.get(node, ())))


def _posix_node(kind: str, name: str) -> tuple[int, int] | None:
    """(device, inode) of a POSIX object, or None if it is gone."""
    try:
        if kind == "queue":  # /dev/mqueue may not be mounted: ask an open descriptor
            queue = posix_ipc.MessageQueue(name, 0)
            try:
                st = os.fstat(queue.mqd)
            finally:
                queue.close()
        else:
            prefix = "/dev/shm/sem." if kind == "semaphore" else "/dev/shm/"
            st = os.stat(prefix + name.lstrip("/"))
    except (OSError, posix_ipc.Error):
        return None
    return st.st_dev, st.st_ino


def _scan_proc() -> dict[tuple[int, int], set[int]]:
    """(device, inode) -> pids, for every file some other live process has open or mapped."""
    index: dict[tuple[int, int], set[int]] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        nodes: set[tuple[int, int]] = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    nodes.add((st.st_dev, st.st_ino))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or fields[4] == "0":
                    continue
                major, _, minor = fields[3].partition(":")
                with contextlib.suppress(ValueError):
                    nodes.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
        if nodes and process_alive(pid):
            for node in nodes:
                index.setdefault(node, set()).add(pid)
    return index
