"""One live run per ledger: a POSIX record lock on a sidecar file, ``PATH-lock``.

Why a sidecar and a POSIX (``fcntl``) lock:

- the kernel drops the lock when its process dies however it dies (SIGKILL, power loss
  is moot), so a crashed run never blocks the next one, and no liveness guess by pid is
  needed;
- POSIX locks are not inherited across ``fork``, so the pool's children (which inherit the
  descriptor) never keep a dead run's lock alive; a ``flock`` lock would be shared with
  them until they died;
- ``F_GETLK`` names the holder's pid for the error message;
- not on the database file itself: closing *any* descriptor of a file drops every POSIX
  lock the process holds on it, SQLite's own locks included.

POSIX locks belong to the process, so a second batch on the same ledger in the *same*
process would take the lock again without a conflict: this process's own holds are also
kept in a set of paths (:data:`_HELD`), checked first.

The sidecar is created 0600 next to the database and left in place (removing a lock file
races with a process about to lock it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

from .._os.recordlock import holder_of_path
from ..errors import LedgerBusyError, ObjectNotFoundError

__all__ = ["RunLock", "check_folder", "holder"]

_HELD: set[str] = set()  # real paths of the ledgers this process holds
_HELD_LOCK = threading.Lock()


def _lock_path(path: str) -> str:
    return path + "-lock"


def holder(path: str) -> int | None:
    """The pid of the live process that holds ``path``'s run lock, or None (no run, or no
    sidecar yet).  Takes no lock."""
    # Asked in the holding process, the query's open and close of the sidecar would drop
    # our own lock (POSIX locks go with any close of the file): answer from _HELD.
    if os.path.realpath(path) in _HELD:
        return os.getpid()
    return holder_of_path(_lock_path(path))


def check_folder(path: str) -> None:
    """Raise ObjectNotFoundError when the directory the ledger ``path`` goes in is
    missing."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ObjectNotFoundError(f"ledger {path}: directory {folder} does not exist",
                                  obj=f"ledger {path!r}")


class RunLock:
    """The run lock of the ledger at ``path``, taken at once; ``release()`` (idempotent)
    gives it back.

    Raises LedgerBusyError naming the holder's pid if a live process holds it, and
    ObjectNotFoundError if the ledger's directory does not exist.
    """

    def __init__(self, path: str, what: str = "runs a batch on") -> None:
        self.path = path
        check_folder(path)
        self._real = os.path.realpath(path)
        self._fd: int | None = None
        with _HELD_LOCK:
            if self._real in _HELD:
                self._real = ""
                self._refuse(os.getpid(), what)
            _HELD.add(self._real)
        try:
            self._fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            self._refuse(holder(path), what)
        except BaseException:
            self.release()
            raise

    def _refuse(self, pid: int | None, what: str) -> None:
        named = f"pid {pid}" if pid is not None else "another process"
        if pid == os.getpid():
            named = f"this process (pid {pid})"
        raise LedgerBusyError(f"ledger {self.path} is in use: {named} {what} it; wait for "
                              "it to end or stop it", pid=pid, obj=f"ledger {self.path!r}")

    def release(self) -> None:
        """Give the lock back (closing the descriptor drops it).  Idempotent."""
        fd, self._fd = self._fd, None
        real, self._real = self._real, ""
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _HELD.discard(real)
