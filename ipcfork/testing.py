"""Helpers for tests, ours and our users': what IPC objects and children exist right now,
and assertions that a block of code leaked none.

``snapshot()`` reads ``/proc/sysvipc`` and lists ``/dev/shm`` and ``/dev/mqueue``: every
object on the machine, whoever made it, so compare a snapshot taken before with one taken
after.  If a probe cannot be read, the helpers raise instead of silently passing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._os.procfs import SYSV_TABLES, stat_fields, sysv_ids

__all__ = [
    "IpcSnapshot",
    "assert_no_children",
    "assert_no_leaks",
    "children",
    "fork_call",
    "snapshot",
    "wait_gone",
    "zombies",
]

@dataclass(frozen=True)
class IpcSnapshot:
    """The IPC objects on this machine at one moment."""

    sysv: frozenset[tuple[str, int]]
    dev_shm: frozenset[str]
    dev_mqueue: frozenset[str] | None  # None where /dev/mqueue is not mounted

    def __sub__(self, earlier: IpcSnapshot) -> IpcSnapshot:
        mq = None
        if self.dev_mqueue is not None:
            mq = self.dev_mqueue - (earlier.dev_mqueue or frozenset())
        return IpcSnapshot(self.sysv - earlier.sysv, self.dev_shm - earlier.dev_shm, mq)

    def __bool__(self) -> bool:
        return bool(self.sysv or self.dev_shm or self.dev_mqueue)

    def describe(self) -> str:
        parts = [f"sysv {kind} id {ident}" for kind, ident in sorted(self.sysv)]
        parts += [f"/dev/shm/{n}" for n in sorted(self.dev_shm)]
        parts += [f"/dev/mqueue/{n}" for n in sorted(self.dev_mqueue or ())]
        return ", ".join(parts) or "nothing"


def snapshot() -> IpcSnapshot:
    """Every SysV object and POSIX shm/semaphore/queue on the machine now.

    Raises OSError if /proc/sysvipc or /dev/shm cannot be read (a check that cannot look
    must not pass).
    """
    sysv = {(kind, ident) for kind in SYSV_TABLES for ident in sysv_ids(kind)}
    dev_shm = frozenset(os.listdir("/dev/shm"))
    mqueue = frozenset(os.listdir("/dev/mqueue")) if os.path.ismount("/dev/mqueue") else None
    return IpcSnapshot(frozenset(sysv), dev_shm, mqueue)


@contextmanager
def assert_no_leaks() -> Iterator[None]:
    """Fail with AssertionError if the block leaves new IPC objects behind."""
    before = snapshot()
    yield
    leaked = snapshot() - before
    if leaked:
        raise AssertionError(f"leaked IPC objects: {leaked.describe()}")


def _stat_fields(pid: int) -> list[str] | None:
    """The ``stat`` fields of ``pid`` (see ``procfs.stat_fields``), or None if it is gone."""
    try:
        return stat_fields(pid)
    except OSError:
        return None


def children(pid: int | None = None) -> list[int]:
    """Pids of the live or zombie children of ``pid`` (default: this process)."""
    parent = os.getpid() if pid is None else pid
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry))
    return sorted(found)


def zombies(pid: int | None = None) -> list[int]:
    """Pids of the zombie children of ``pid`` (default: this process)."""
    return [c for c in children(pid) if (_stat_fields(c) or ["?"])[0] == "Z"]


def assert_no_children() -> None:
    """Raise AssertionError if this process has any child, live or zombie."""
    left = children()
    if left:
        raise AssertionError(f"child processes left behind: {left}")


def fork_call(target: object, *args: object) -> int:
    """Fork; in the child run ``target(*args)`` and ``_exit`` with its int result (0 for
    None, 1 after an exception, whose traceback goes to stderr).  Returns the child's pid.

    The child never returns into the caller's code, whatever happens.
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        result = target(*args)  # type: ignore[operator]
        status = 0 if result is None else int(result)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(status)


def wait_gone(pids: Iterable[int], timeout: float = 30.0) -> list[int]:
    """Wait until every process of ``pids`` has ended, children or not (through pidfds:
    no polling, no sleeping); returns those still alive after ``timeout`` seconds."""
    import select
    import time

    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds.values()), [], [],
                                        max(0.0, deadline - time.monotonic()))
            for pid, fd in list(fds.items()):
                if fd in ready:
                    os.close(fds.pop(pid))
        return sorted(fds)
    finally:
        for fd in fds.values():
            os.close(fd)
