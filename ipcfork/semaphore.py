"""Counting semaphores over SysV or POSIX semaphores.

No SEM_UNDO: a release made by a process that has since exited stays, so a producer that
exits does not take its items with it.  (Mutexes, which need the opposite, use undo.)
"""

from __future__ import annotations

import contextlib
import os
from types import TracebackType
from typing import Any

from . import errors
from ._common import check_count, describe, on_creator_exit, sysv_key_for
from ._os.posix import SEM_VALUE_MAX, PosixSemaphore
from ._os.sysv import SEMVMX, SysvSemaphore
from ._os.timeouts import check_timeout

__all__ = ["Semaphore"]


def _open_sem(
    kind: str, value: int, name: str | os.PathLike[str] | None, *, backend: str,
    create: bool, exclusive: bool, allow_foreign: bool, proj: int | str, undo: bool,
    hold_guard: bool = False,
) -> PosixSemaphore | SysvSemaphore:
    """Create or open the backend semaphore behind a Semaphore or Mutex (``hold_guard``: see
    :class:`SysvSemaphore`)."""
    key = sysv_key_for(name, proj, backend)
    what = describe(kind, name, backend)
    if backend == "posix":
        if name is not None and not isinstance(name, str):
            raise errors.InvalidArgumentError(f"a POSIX name must be a str, not {name!r}")
        return PosixSemaphore(name, value, create=create, exclusive=exclusive,
                              allow_foreign=allow_foreign, what=what)
    return SysvSemaphore(key, value, create=create, exclusive=exclusive,
                         allow_foreign=allow_foreign, undo=undo, what=what,
                         hold_guard=hold_guard)


def release_anonymous(impl: PosixSemaphore | SysvSemaphore) -> None:
    """Remove an anonymous SysV semaphore when its creator is done (POSIX ones are unlinked)."""
    if isinstance(impl, SysvSemaphore) and impl.anonymous:
        with contextlib.suppress(errors.IpcforkError):
            impl.unlink()


class Semaphore:
    """A counting semaphore shared by processes.

    ``Semaphore(value=1)`` is anonymous: share it with children through ``fork``.  With
    ``name=`` (a POSIX name such as ``"/slots"``, or for ``backend="sysv"`` a path turned into
    a key by ``ftok(path, proj)``) unrelated processes meet it.  By default a named semaphore
    is created if missing and opened untouched if present (``exclusive=True`` insists on
    creating, ``create=False`` on opening).  ``value`` is only used on creation.

    Raises InvalidArgumentError for a bad value or name, UnsafeObjectError when the existing
    object belongs to another user or is writable by others (unless ``allow_foreign``),
    ObjectExistsError / ObjectNotFoundError as ``exclusive`` / ``create`` demand.
    """

    def __new__(cls, *args: Any, backend: str = "posix", **options: Any) -> Semaphore:
        if cls is Semaphore and backend == "dask":  # ipcfork.dask: imported on first use
            from .dask.locks import DaskSemaphore

            return object.__new__(DaskSemaphore)
        return object.__new__(cls)

    def __init__(
        self,
        value: int = 1,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        high = SEM_VALUE_MAX if backend == "posix" else SEMVMX
        check_count(value, "Semaphore value", low=0, high=high)
        self.backend = backend
        self.name = None if name is None else os.fspath(name)
        self._impl = _open_sem("Semaphore", value, name, backend=backend, create=create,
                               exclusive=exclusive, allow_foreign=allow_foreign, proj=proj,
                               undo=False)
        self._finalizer = on_creator_exit(self, release_anonymous, self._impl)
        if not (self._impl.created and self._impl.anonymous):
            self._finalizer.detach()

    def __repr__(self) -> str:
        return f"<Semaphore {self._impl.what} value={self._impl.value}>"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one unit; return True if taken, False if ``timeout`` passed first.

        ``blocking=False`` tries once.  ``timeout`` is in seconds (None: wait forever).
        Signals arriving while waiting run their handlers and the wait goes on with the time
        remaining.  Raises InvalidArgumentError for a negative timeout or a timeout given
        with ``blocking=False``.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
            if not blocking:
                raise errors.InvalidArgumentError("a timeout makes no sense with blocking=False")
        return self._impl.acquire(blocking, timeout)

    def release(self, n: int = 1) -> None:
        """Add ``n`` units, waking up to ``n`` waiters.

        Raises InvalidArgumentError if ``n`` < 1 and LimitExceededError past the backend's
        maximum value (32767 for sysv).
        """
        if n != 1:
            check_count(n, "release count", low=1, high=SEM_VALUE_MAX)
        self._impl.release(n)

    @property
    def value(self) -> int:
        """The current value (a snapshot: other processes may change it at once)."""
        return self._impl.value

    def __enter__(self) -> Semaphore:
        self._impl.acquire(True, None)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._impl.release(1)

    def close(self) -> None:
        """Drop this process's handle.  An anonymous SysV semaphore is removed when its
        creator closes it (POSIX anonymous ones vanish with their last handle)."""
        self._finalizer()
        self._impl.close()

    def unlink(self) -> None:
        """Remove a named semaphore system-wide; processes that have it open keep using it
        (POSIX) or get ObjectNotFoundError (SysV).  Raises ObjectNotFoundError if gone."""
        self._impl.unlink()
