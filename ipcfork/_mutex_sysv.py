"""The SysV backend of :class:`~ipcfork.Mutex`: a semaphore taken with SEM_UNDO plus an owner
word, for interop with PHP and C programs that meet it by ``ftok`` key.

The kernel gives the semaphore back when the holder dies, even by SIGKILL, and wakes a waiter
at once.  A clean release zeroes the owner word *before* giving the semaphore back, so the
next holder finding a token there knows the previous owner died holding the mutex.

A named mutex's owner word lives in its own segment, key ``ftok(path, proj ^ 0x80)``, so it
never lands in a segment the user named alike.  A semaphore set that another program made
(PHP's ``sem_get``) has no owner word: ``owner`` then comes from the kernel's last-operation
pid and owner death is not reported (the kernel still releases it).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

import sysv_ipc

from . import errors
from ._common import on_creator_exit
from ._identity import IDENTITY, token_pid
from ._libc import sem_member_exists
from ._native import SysvLockCore
from ._sysv import IPC_NOWAIT, SEM_UNDO, SysvSemaphore, open_sysv_shm, semop
from ._timeouts import check_timeout
from .mutex import Mutex
from .semaphore import _open_sem

__all__ = ["OWNER_KEY_FLIP", "SysvMutex"]

_STATE_SIZE = mmap.PAGESIZE
OWNER_KEY_FLIP = 0x80 << 24  # the owner word's key: ftok(path, proj ^ 0x80), proj the top byte
_PHP_GUARD_WAIT = 10.0  # seconds to wait for PHP's sem_get init guard
_ident = IDENTITY  # one global load + one slot load on the fast path


class SysvMutex(SysvLockCore, Mutex):  # type: ignore[misc]  # SysvLockCore: chosen at import
    """``Mutex(backend="sysv")``: see the module docstring and :class:`~ipcfork.Mutex`.

    ``acquire``, ``release``, ``__enter__`` and ``__exit__`` are the native core's
    (``SysvLockCore``): a signal handler cannot run between taking the semaphore and
    recording the holder, nor between the start of a release and the semop that gives it
    back.  Timed and non-blocking acquires come back here, to ``_acquire_slowly``.
    """

    __slots__ = (
        "__weakref__",
        "_finalizer",
        "_foreign",
        "_owner",
        "_php_user",
        "_sem",
        "_state",
        "_what",
        "backend",
        "name",
    )

    def __init__(
        self,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "sysv",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        self.backend = "sysv"
        self.name = None if name is None else os.fspath(name)
        sem = _open_sem("Mutex", 1, name, backend="sysv", create=create, exclusive=exclusive,
                        allow_foreign=allow_foreign, proj=proj, undo=True)
        assert isinstance(sem, SysvSemaphore)  # _open_sem makes what backend names
        self._sem = sem
        self._what = self._sem.what
        self._foreign = False
        self._php_user = 0
        try:
            self._state: Any = self._open_state(create or self._sem.created, allow_foreign)
        except BaseException:
            self._drop_sem()
            raise
        self._owner = memoryview(self._state).cast("Q")
        self._sysv_bind(self._sem.semid, self._state, self._what)
        self._finalizer = on_creator_exit(self, _remove_anonymous, self._sem)
        if not (self._sem.created and self._sem.anonymous):
            self._finalizer.detach()

    def _open_state(self, create: bool, allow_foreign: bool) -> Any:
        """Open the shared word holding the owner's token."""
        sem = self._sem
        if not sem.created and sem_member_exists(sem.semid, 1):
            # ipcfork's sets have one member; a larger one was made by another program (PHP's
            # sem_get makes three).  Its owner has no owner word, and a segment under the same
            # key is that program's data, which we must not write into: track locally.
            self._foreign = True
            if sem_member_exists(sem.semid, 2):
                self._join_php_users()
            return bytearray(8)
        key = None if sem.anonymous else sem.key ^ OWNER_KEY_FLIP
        raw, _ = open_sysv_shm(key, _STATE_SIZE, create=create, exclusive=False,
                               allow_foreign=allow_foreign, what=self._what)
        return raw

    def _join_php_users(self) -> None:
        """Count ourselves among the users of a PHP ``sem_get`` set, as PHP does.

        PHP resets the lock to its maximum whenever ``sem_get`` finds the usage count (member
        1) at zero, which would break a lock we hold; so we take part in its protocol: wait
        for member 2 (an init guard) to be zero and raise it, add one to the usage count,
        lower the guard, all with SEM_UNDO so a SIGKILL undoes our share.

        Raises WaitTimeoutError if the guard stays taken for 10 s.
        """
        semid = self._sem.semid
        if not semop(semid, [(2, 0, 0), (2, 1, SEM_UNDO)], _PHP_GUARD_WAIT, self._what,
                     "join PHP users"):
            raise errors.WaitTimeoutError(
                f"{self._what}: PHP's init guard (member 2) stayed taken",
                obj=self._what, backend="sysv", limit=f"{_PHP_GUARD_WAIT} s")
        semop(semid, [(2, -1, SEM_UNDO), (1, 1, SEM_UNDO)], None, self._what,
              "join PHP users")
        self._php_user = _ident.pid

    def _leave_php_users(self) -> None:
        # Only the process that joined carries the SEM_UNDO adjustment to balance.
        if self._php_user == _ident.pid:
            self._php_user = 0
            with contextlib.suppress(errors.IpcforkError):
                semop(self._sem.semid, [(1, -1, SEM_UNDO | IPC_NOWAIT)], 0, self._what,
                      "leave PHP users")

    def __repr__(self) -> str:
        owner = self.owner
        state = f"locked by {owner}" if owner else "unlocked"
        return f"<Mutex {self._what} {state}>"

    # -- taking and giving back (the fast paths are SysvLockCore's) ----------------------------

    def _acquire_slowly(self, blocking: bool, timeout: float | None) -> bool:
        if self._state is None:
            raise errors.ObjectClosedError(f"{self._what} is closed in this process",
                                           obj=self._what, backend="sysv")
        timeout = check_timeout(timeout)
        if not blocking and timeout is not None:
            raise errors.InvalidArgumentError("a timeout makes no sense with blocking=False")
        if not (self._sem.try_acquire() or (blocking and self._sem.acquire_slow(timeout))):
            return False
        self._took()
        return True

    def _not_owner(self) -> None:
        """Raise NotOwnerError (the core calls this when this process does not hold it)."""
        holder = self.owner
        raise errors.NotOwnerError(
            f"{self._what} is held by "
            + (f"pid {holder}" if holder else "nobody")
            + f", not by this process (pid {_ident.pid}); only the holder may release it",
            obj=self._what,
            backend="sysv",
        )

    # -- queries and lifetime -----------------------------------------------------------------

    @property
    def owner(self) -> int | None:
        token = self._owner[0]
        if token:
            return token_pid(token)
        if self._foreign and self._sem.value == 0:
            return self._sem.last_pid
        return None

    def locked(self) -> bool:
        return self._sem.value == 0

    def _drop_sem(self) -> None:
        if self._sem.created:
            with contextlib.suppress(errors.IpcforkError):
                self._sem.unlink()
        self._sem.close()

    def close(self) -> None:
        if self._state is None:
            return
        self._finalizer()
        self._leave_php_users()
        self._sysv_unbind()
        self._owner.release()
        if not self._foreign:
            with contextlib.suppress(sysv_ipc.Error):
                self._state.detach()
        self._state = None
        self._sem.close()

    def unlink(self) -> None:
        if not self._sem.anonymous and not self._foreign:
            with contextlib.suppress(sysv_ipc.Error):
                if self._state is not None:
                    self._state.remove()
                else:  # closed already: find the owner word by its key
                    segment = sysv_ipc.SharedMemory(self._sem.key ^ OWNER_KEY_FLIP)
                    try:
                        segment.remove()
                    finally:
                        segment.detach()  # opening attached it
        self._sem.unlink()


def _remove_anonymous(sem: SysvSemaphore) -> None:
    with contextlib.suppress(errors.IpcforkError):
        sem.unlink()
