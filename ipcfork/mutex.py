"""Robust mutexes with ownership: the public :class:`Mutex` and the backends behind it.

``backend="posix"`` (default, ``_mutex_posix``)
    A robust process-shared pthread mutex from the native core, in POSIX shared memory.  The
    uncontended path is one compare-and-swap in C; the kernel releases the mutex of a thread
    that dies holding it, at any instruction.
``backend="sysv"`` (``_mutex_sysv``)
    A SysV semaphore taken with SEM_UNDO plus an owner word, so PHP and C programs can share
    it by ``ftok`` key; the kernel gives the semaphore back when the holder dies.

While a holder holds a mutex whose previous owner died holding it, ``previous_owner_died``
is True and ``dead_owner_pid`` names the dead owner: the data the mutex guards may be
half-updated.
"""

from __future__ import annotations

import os
from typing import Any

from ._os.names import check_backend

__all__ = ["Mutex", "companion_lock"]


class Mutex:
    """A binary lock owned by one holder at a time, released by the kernel when its holder
    dies (even by SIGKILL), the next holder being told.

    ``Mutex()`` is anonymous (share it through ``fork``); ``Mutex(name)`` is named, as for
    :class:`Semaphore` (POSIX name, or a file path turned into a SysV key by ``ftok``).  The
    holder is a thread with the posix backend (as for a pthread mutex) and a process with
    the sysv backend (as for a SEM_UNDO semaphore).  Opening a SysV semaphore set that another
    program made (PHP's ``sem_get``) works too.

    Raises as :class:`Semaphore` does for bad names, foreign or missing objects;
    ObjectCorruptError when a named object holds something else.
    """

    __slots__ = ()

    def __new__(cls, name: str | os.PathLike[str] | None = None, *, backend: str = "posix",
                **options: Any) -> Mutex:
        if cls is Mutex:
            if backend == "dask":  # imported here: ``import ipcfork`` never imports dask
                from .dask.locks import DaskMutex

                return DaskMutex.__new__(DaskMutex, name, backend=backend, **options)
            check_backend(backend)
            if backend == "posix":
                from ._mutex_posix import PosixMutex as implementation
            else:
                from ._mutex_sysv import SysvMutex as implementation
            self: Mutex = implementation.__new__(implementation, name, backend=backend,
                                                 **options)
            return self
        return object.__new__(cls)

    # The methods below document the interface; each backend provides them.

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the mutex; True if taken, False if ``timeout`` seconds passed first (or, with
        ``blocking=False``, if it is held).

        A mutex is not re-entrant.  Signals arriving while waiting run their handlers and the
        wait goes on with the time remaining; a handler that raises (Ctrl-C) ends it.  Raises
        InvalidArgumentError for a bad timeout or one given with ``blocking=False``;
        DeadlockError (posix) when the calling thread holds it already.
        """
        raise NotImplementedError  # pragma: no cover - each backend has its own

    def release(self) -> None:
        """Give the mutex back.  Raises NotOwnerError unless the caller holds it (a forked
        child of the holder does not)."""
        raise NotImplementedError  # pragma: no cover

    def __enter__(self) -> bool:
        """Take the mutex, waiting as long as it takes."""
        raise NotImplementedError  # pragma: no cover

    def __exit__(self, *exc_info: object) -> None:
        """Give the mutex back."""
        raise NotImplementedError  # pragma: no cover

    @property
    def owner(self) -> int | None:
        """The pid of the holder, or None when unlocked (a snapshot)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def previous_owner_died(self) -> bool:
        """True while the caller holds the mutex and its previous holder died holding it."""
        raise NotImplementedError  # pragma: no cover

    @property
    def dead_owner_pid(self) -> int | None:
        """The pid of the holder that died, while :attr:`previous_owner_died` is True (None
        if it died before it could record itself)."""
        raise NotImplementedError  # pragma: no cover

    def locked(self) -> bool:
        """True if someone holds the mutex (a snapshot)."""
        raise NotImplementedError  # pragma: no cover

    def close(self) -> None:
        """Drop this process's handle.  Raises BufferInUseError (posix) while a thread of this
        process holds it; closing twice is harmless."""
        raise NotImplementedError  # pragma: no cover

    def unlink(self) -> None:
        """Remove a named mutex system-wide.  Raises ObjectNotFoundError if already gone."""
        raise NotImplementedError  # pragma: no cover


def companion_lock(name: str | os.PathLike[str] | None, *, backend: str, create: bool,
                   allow_foreign: bool, proj: int | str) -> Mutex:
    """The lock that guards a named shared object (``name``): a Mutex named ``<name>.lock``
    for posix, or keyed ``ftok(path, proj + 1)`` for sysv; anonymous for an anonymous one."""
    lock_name: str | os.PathLike[str] | None = name
    lock_proj = proj
    if name is not None and backend == "posix":
        lock_name = f"{os.fspath(name)}.lock"
    elif name is not None:
        lock_proj = (ord(proj) if isinstance(proj, str) else proj) % 255 + 1
    return Mutex(lock_name, backend=backend, create=create, allow_foreign=allow_foreign,
                 proj=lock_proj)
