"""The service's pidfile: written atomically, locked for the service's lifetime, removed at
exit, taken over when the service that wrote it is dead.

The lock is a POSIX record lock (``fcntl`` ``F_SETLK``) on the file that the path names.
Such a lock belongs to the process, not to an open file, so the workers the supervisor forks
do not inherit it, and the kernel drops it when the supervisor dies, however it dies (a
SIGKILLed service leaves a file whose lock is free: that is what "stale" means here, not a
guess from the pid, which the kernel may have reused).  ``F_GETLK`` names the holder
without taking the lock, which is how ``ipcfork status`` and a refused second service learn
the live pid.

Writing is atomic: the content goes into a temporary file in the same directory, which is
locked and then renamed over the path, so a reader never sees a half-written pid.  Whoever
locks the old file checks afterwards that the path still names it (an ``fstat``/``stat``
inode comparison) and starts again if not, so two services racing for a stale pidfile cannot
both win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from .._os.recordlock import holder_of
from ..errors import InvalidArgumentError, ServiceError, ServiceRunningError, UnsafeObjectError

__all__ = ["Pidfile", "read_pid"]

_ATTEMPTS = 10


def _parse_pid(raw: bytes) -> int | None:
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


def read_pid(path: str) -> int | None:
    """The pid written in ``path``, or None if the file is missing, empty or not a pid.

    Never call it in the process that holds the pidfile: the close would drop the lock.
    """
    try:
        with open(path, "rb") as file:
            return _parse_pid(file.read(32))
    except FileNotFoundError:
        return None


def _check_safe(fd: int, path: str, allow_foreign: bool) -> None:
    info = os.fstat(fd)
    if allow_foreign:
        return
    if info.st_uid != os.geteuid():
        raise UnsafeObjectError(
            f"pidfile {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}); pass allow_foreign=True to use it anyway", obj=path)
    if info.st_mode & 0o022:
        raise UnsafeObjectError(
            f"pidfile {path} is writable by others (mode {info.st_mode & 0o777:o}); "
            "fix its mode or pass allow_foreign=True", obj=path)


class Pidfile:
    """One service's pidfile at ``path`` (made absolute, so a later ``chdir`` changes
    nothing).  Raises InvalidArgumentError when the directory does not exist."""

    def __init__(self, path: str | os.PathLike[str], *, allow_foreign: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise InvalidArgumentError(f"pidfile {self.path}: directory {directory} does not "
                                       "exist")
        self._allow_foreign = allow_foreign
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def acquire(self) -> int | None:
        """Lock the pidfile and write this process's pid into it.  Returns the pid a dead
        service left in it (a stale pidfile taken over), else None.

        Raises ServiceRunningError naming the live pid when another service holds it,
        UnsafeObjectError when the file belongs to another user or others can write it,
        ServiceError when the path keeps being replaced under us, and OSError when the
        directory cannot be written.

        While the lock is held, nothing in this process may open and close the pidfile's
        path (:func:`read_pid` included): the close would drop the lock.
        """
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _check_safe(fd, self.path, self._allow_foreign)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    holder = holder_of(fd) or read_pid(self.path)
                    raise ServiceRunningError(
                        f"pidfile {self.path} is held by a running service (pid {holder}); "
                        "stop it first or choose another pidfile", obj=self.path,
                        pid=holder) from None
                if not self._still_named(fd):
                    continue  # replaced while we locked it: lock the new one instead
                # Read through the locked descriptor: opening and closing the path again
                # would drop this process's lock on it (POSIX record locks are per process
                # and file, and go with the first close), and a racer could take it.
                stale = _parse_pid(os.pread(fd, 32, 0))
                self._replace_with_ours(fd)
                return stale if stale != os.getpid() else None
            finally:
                os.close(fd)  # the lock on the old file goes with it; ours is on the new one
        raise ServiceError(f"pidfile {self.path} keeps being replaced; is another program "
                           "writing it?", obj=self.path)

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def _replace_with_ours(self, locked_fd: int) -> None:
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):  # left by a dead process of our pid
            os.unlink(temporary)
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, f"{os.getpid()}\n".encode())
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
            os.rename(temporary, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        info = os.fstat(fd)
        self._fd, self._inode = fd, (info.st_dev, info.st_ino)

    @property
    def fd(self) -> int | None:
        """The descriptor that holds the lock (None before :meth:`acquire`)."""
        return self._fd

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then drop the lock.  Harmless twice."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            named = os.stat(self.path)
            if (named.st_dev, named.st_ino) == self._inode:
                os.unlink(self.path)  # before unlocking: nobody can lock a file we remove
        os.close(self._fd)
        self._fd = None
