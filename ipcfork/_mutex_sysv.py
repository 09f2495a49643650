"""The SysV backend of :class:`~ipcfork.Mutex`: a semaphore taken with SEM_UNDO plus an owner
word, for interop with PHP and C programs that meet it by ``ftok`` key.

The kernel gives the semaphore back when the holder dies, even by SIGKILL, and wakes a waiter
at once.  A clean release zeroes the owner word *before* giving the semaphore back, so the
next holder finding a token there knows the previous owner died holding the mutex.

A named mutex's owner word lives in its own segment, key ``ftok(path, proj ^ 0x80)``, so it
never lands in a segment the user named alike.  A named mutex's semaphore set has PHP's
``sem_get`` layout (see ``_sysv``), so PHP can join it.  A set that PHP made has no owner
word: ``owner`` then comes from the kernel's last-operation pid and owner death is not
reported (the kernel still releases it).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

import sysv_ipc

from . import errors
from ._common import on_creator_exit
from ._os.identity import IDENTITY, token_pid
from ._os.native import SysvLockCore
from ._os.sysv import SysvSemaphore, open_sysv_shm
from .mutex import Mutex
from .semaphore import _open_sem

__all__ = ["OWNER_KEY_FLIP", "SysvMutex"]

_STATE_SIZE = mmap.PAGESIZE
OWNER_KEY_FLIP = 0x80 << 24  # the owner word's key: ftok(path, proj ^ 0x80), proj the top byte
_ident = IDENTITY  # one global load + one slot load on the fast path


class SysvMutex(SysvLockCore, Mutex):  # type: ignore[misc]  # SysvLockCore: chosen at import
    """``Mutex(backend="sysv")``: see the module docstring and :class:`~ipcfork.Mutex`.

    ``acquire``, ``release``, ``__enter__`` and ``__exit__`` are the native core's
    (``SysvLockCore``): a signal handler cannot run between taking the semaphore and
    recording the holder, nor between the start of a release and the semop that gives it
    back.
    """

    __slots__ = (
        "__weakref__",
        "_finalizer",
        "_foreign",
        "_owner",
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
        # The creator keeps the set's init guard until the owner word exists: openers wait
        # for the guard, then tell an ipcfork set (owner word) from PHP's (none).
        sem = _open_sem("Mutex", 1, name, backend="sysv", create=create, exclusive=exclusive,
                        allow_foreign=allow_foreign, proj=proj, undo=True, hold_guard=True)
        assert isinstance(sem, SysvSemaphore)  # _open_sem makes what backend names
        self._sem = sem
        self._what = self._sem.what
        self._foreign = False
        try:
            self._state: Any = self._open_state(create or self._sem.created, allow_foreign)
            self._owner = memoryview(self._state).cast("Q")
            if self._sem.created:
                self._owner[0] = 0  # a word left by an earlier set under this key is stale
            self._sem.release_guard()
        except BaseException:
            self._drop_sem()
            raise
        self._sysv_bind(self._sem.semid, self._state, self._what)
        self._finalizer = on_creator_exit(self, _remove_anonymous, self._sem)
        if not (self._sem.created and self._sem.anonymous):
            self._finalizer.detach()

    def _open_state(self, create: bool, allow_foreign: bool) -> Any:
        """Open the shared word holding the owner's token.

        A set in PHP's layout that another process made has an owner word if ipcfork made
        it (its creator made the word before lowering the init guard, which we have passed
        since); if not, PHP's ``sem_get`` made it: there is no owner word, and a segment
        under the set's key is that program's data, which we must not write into, so the
        owner is tracked locally.
        """
        sem = self._sem
        key = None if sem.anonymous else sem.key ^ OWNER_KEY_FLIP
        if not sem.created and sem.php_layout:
            try:
                raw, _ = open_sysv_shm(key, _STATE_SIZE, create=False, exclusive=False,
                                       allow_foreign=allow_foreign, what=self._what)
            except errors.ObjectNotFoundError:
                self._foreign = True
                return bytearray(8)
            return raw
        raw, _ = open_sysv_shm(key, _STATE_SIZE, create=create, exclusive=False,
                               allow_foreign=allow_foreign, what=self._what)
        return raw

    def __repr__(self) -> str:
        owner = self.owner
        state = f"locked by {owner}" if owner else "unlocked"
        return f"<Mutex {self._what} {state}>"

    # -- taking and giving back (the fast paths are SysvLockCore's) ----------------------------

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
        self._sysv_unbind()  # refuses while held or waited for here: before anything else
        self._finalizer()
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
