"""Thin adapter over posix_ipc: safe create-or-open, owner checks, timeouts, EINTR retry.

Blocking waits go through ``_libc`` (ctypes) on our own mapping of the semaphore, because
posix_ipc swallows exceptions raised by signal handlers during its waits.

Anonymous objects are unlinked right after creation: the kernel keeps them alive while a
process of the family has them open or mapped, so they cannot leak.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import posix_ipc

from ..errors import (
    InvalidArgumentError,
    LimitExceededError,
    ObjectClosedError,
    ObjectCorruptError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from . import registry as _registry
from .libc import WAIT_DONE, WAIT_INTERRUPTED, sem_close, sem_open, sem_timedwait
from .names import anonymous_posix_name, posix_name
from .opening import create_or_open
from .security import CREATE_MODE, SEM_T_SIZE, check_owner, check_posix_file, posix_sem_path
from .timeouts import Deadline
from .translate import translate_exception, translating

__all__ = ["PosixSemaphore", "open_posix_shm", "resolve_posix_name", "unlink_posix"]

SEM_VALUE_MAX: int = posix_ipc.SEMAPHORE_VALUE_MAX
INIT_WAIT = 2.0  # seconds an opener waits for a creator to size a new shm object


def resolve_posix_name(name: str | None, kind: str) -> tuple[str, bool]:
    """Return ``(posix name, anonymous?)`` for a user-supplied name or None."""
    if name is None:
        return anonymous_posix_name(kind), True
    return posix_name(name), False


class PosixSemaphore:
    """A POSIX named semaphore with safe opening and timeouts that survive signals."""

    __slots__ = ("anonymous", "created", "handle", "name", "raw", "what")

    def __init__(
        self,
        name: str | None,
        initial: int,
        *,
        create: bool,
        exclusive: bool,
        allow_foreign: bool,
        what: str,
    ) -> None:
        if not 0 <= initial <= SEM_VALUE_MAX:
            raise InvalidArgumentError(
                f"initial value {initial} is out of range for {what}",
                obj=what,
                backend="posix",
                limit=f"0..{SEM_VALUE_MAX} (SEM_VALUE_MAX)",
            )
        self.name, self.anonymous = resolve_posix_name(name, "sem")
        self.what = what

        def open_existing() -> Any:
            # Check before sem_open maps the file: a short file would SIGBUS the interpreter.
            check_posix_file(
                posix_sem_path(self.name), what, allow_foreign=allow_foreign, min_size=SEM_T_SIZE
            )
            return posix_ipc.Semaphore(self.name, 0)

        try:
            self.raw: Any
            self.raw, self.created = create_or_open(
                lambda: posix_ipc.Semaphore(self.name, posix_ipc.O_CREX, mode=CREATE_MODE,
                                            initial_value=initial),
                open_existing, creating=create or self.anonymous,
                exclusive=exclusive or self.anonymous, what=what, backend="posix")
        except ObjectExistsError:
            raise ObjectExistsError(f"{what} already exists", obj=what, backend="posix") from None
        if self.created:
            # sem_open honours the umask, which may only clear bits: force 0600.
            os.chmod(posix_sem_path(self.name), CREATE_MODE)
            if not self.anonymous:
                _registry.remember("posix", "semaphore", self.name)
        try:
            # Our own mapping for waits through ctypes; see _libc for why.
            self.handle = sem_open(self.name)
        except OSError as exc:
            raise translate_exception(exc, what, "posix", "open") from exc
        finally:
            if self.anonymous:
                self.raw.unlink()

    def acquire(self, blocking: bool, timeout: float | None) -> bool:
        """Take one unit: try at once (no system call), then wait if ``blocking``."""
        try:
            self.raw.acquire(0.0)
        except posix_ipc.BusyError:
            if not blocking:
                return False
        except posix_ipc.Error as exc:
            raise translate_exception(exc, self.what, "posix", "acquire") from exc
        except BaseException:
            # A signal handler raised (Ctrl-C) just after the unit was taken (sem_trywait
            # runs no handler itself): give the unit back rather than lose it.
            self.raw.release()
            raise
        else:
            return True
        return self.acquire_slow(timeout)

    def try_acquire(self) -> bool:
        """Take one unit without blocking; False if none is free."""
        try:
            self.raw.acquire(0)
            return True
        except posix_ipc.BusyError:
            return False
        except posix_ipc.Error as exc:
            raise translate_exception(exc, self.what, "posix", "acquire") from exc

    def acquire_slow(self, timeout: float | None) -> bool:
        """Block until acquired or ``timeout`` passes; retried across signals."""
        if not self.handle:
            raise ObjectClosedError(f"{self.what} is closed in this process", obj=self.what,
                                    backend="posix")
        deadline = Deadline(timeout)
        while True:
            try:
                outcome = sem_timedwait(self.handle, deadline.remaining())
            except OSError as exc:
                raise translate_exception(exc, self.what, "posix", "acquire") from exc
            # On EINTR the Python handler runs at the next bytecode; if it raises, we stop.
            if outcome != WAIT_INTERRUPTED:
                return outcome == WAIT_DONE

    def release(self, n: int = 1) -> None:
        try:
            self.raw.release()
            for _ in range(n - 1):
                self.raw.release()
        except (posix_ipc.Error, OverflowError, ValueError) as exc:
            raise translate_exception(exc, self.what, "posix", "release") from exc

    @property
    def value(self) -> int:
        with translating(self.what, "posix", "value"):
            return int(self.raw.value)

    def close(self) -> None:
        if self.handle:
            sem_close(self.handle)
            self.handle = 0
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.raw.close()

    def unlink(self) -> None:
        if not self.anonymous:
            unlink_posix("semaphore", self.name, self.what)


def _shm_limit() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def open_posix_shm(
    name: str, size: int | None, *, create: bool, exclusive: bool, allow_foreign: bool,
    what: str, track: bool = False,
) -> tuple[int, int, bool]:
    """Create or open a POSIX shared memory object; return ``(fd, size, created)``.

    A new object is zero-filled and its pages are reserved with ``posix_fallocate`` so a
    full ``/dev/shm`` is an error now rather than a SIGBUS later.  Opening an object its
    creator has not sized yet waits for that (up to ``INIT_WAIT`` s), then raises
    ObjectCorruptError; UnsafeObjectError for a foreign object (unless ``allow_foreign``).
    """
    if create or exclusive:
        if size is None:
            raise InvalidArgumentError(f"creating {what} needs a size", obj=what, backend="posix")
        room = _shm_limit()
        if size > room:
            raise LimitExceededError(
                f"{what}: {size} bytes requested but /dev/shm has {room} bytes free",
                obj=what,
                backend="posix",
                limit=f"size <= {room} (free space in /dev/shm)",
            )
    shm, created = create_or_open(
        lambda: posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=CREATE_MODE),
        lambda: posix_ipc.SharedMemory(name, 0),
        creating=create or exclusive, exclusive=exclusive, what=what, backend="posix")
    fd = os.dup(shm.fd)  # not inheritable, as every descriptor Python makes
    shm.close_fd()
    if created:
        assert size is not None  # checked above: creating needs a size
        try:
            os.fchmod(fd, CREATE_MODE)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            posix_ipc.unlink_shared_memory(name)
            with translating(what, "posix", "reserve"):
                raise exc
        if track:
            _registry.remember("posix", "shm", name)
        return fd, size, True
    st = os.fstat(fd)
    try:
        check_owner(st.st_uid, st.st_mode, what, "posix", allow_foreign=allow_foreign)
        size = st.st_size or _wait_sized(fd, name, what)
    except BaseException:
        os.close(fd)
        raise
    return fd, size, False


def _wait_sized(fd: int, name: str, what: str) -> int:
    """The size of an object found empty, once its creator has sized it.

    A creator sizes a new object right after ``shm_open`` (``posix_fallocate`` sets the
    size in one step); an opener in between sees 0 bytes.  Waits up to ``INIT_WAIT`` s
    (there is nothing to block on: poll).  Raises ObjectCorruptError naming the object
    and the limit if it stays empty (its creator died before sizing it).
    """
    deadline = time.monotonic() + INIT_WAIT
    while True:
        size = os.fstat(fd).st_size
        if size:
            return size
        if time.monotonic() >= deadline:
            raise ObjectCorruptError(
                f"{what} (/dev/shm{name}) is still empty (0 bytes) {INIT_WAIT} s after "
                "opening: its creator did not size it (it may have died while creating "
                "it); unlink it and create it again",
                obj=what, backend="posix", limit=f"{INIT_WAIT} s for the creator to size it")
        time.sleep(0.001)


_UNLINKERS = {"semaphore": posix_ipc.unlink_semaphore, "shm": posix_ipc.unlink_shared_memory,
              "queue": posix_ipc.unlink_message_queue}


def unlink_posix(kind: str, name: str, what: str) -> None:
    """Remove the named POSIX object ``name`` of ``kind`` (``semaphore``, ``shm``,
    ``queue``) system-wide, and its registry record.

    Raises ObjectNotFoundError if it is already gone, other ipcfork errors as the unlink
    call fails.
    """
    _registry.forget("posix", kind, name)
    with translating(what, "posix", "unlink"):
        try:
            _UNLINKERS[kind](name)
        except posix_ipc.ExistentialError:
            raise ObjectNotFoundError(f"{what} was already removed", obj=what,
                                      backend="posix") from None
