"""Robust mutexes with ownership, over POSIX or SysV semaphores.

The holder's *token* (pid + start time, see ``_identity``) is kept in a word of shared
memory next to the semaphore.  That word gives ``owner``, refuses a release by anyone but
the holder, and makes the mutex robust:

A named mutex's owner word lives in its own segment (POSIX ``<name>.owner``; SysV key
``ftok(path, proj ^ 0x80)``) so it never lands in a segment the user named alike.

``backend="sysv"``
    The semaphore is taken with SEM_UNDO, so the kernel gives it back when the holder dies,
    even by SIGKILL, and wakes a waiter at once.  A clean release zeroes the owner word
    *before* giving the semaphore back, so the next holder finding a token there knows the
    previous owner died holding the mutex.
``backend="posix"`` (default, fast: the uncontended path makes no system call)
    POSIX semaphores are not given back on death.  A waiter therefore sleeps in slices of
    ``ROBUST_SLICE`` seconds; when a slice ends it checks whether the recorded owner still
    runs and, if not, takes the mutex over (serialised by a ``lockf`` lock on the state
    segment, which the kernel also drops on death).  Known gap: a process killed in the few
    instructions between taking the semaphore and writing its token leaves the mutex held
    with no owner recorded; that state is not recovered automatically (``ipcfork`` would
    have to guess, and a wrong guess breaks mutual exclusion).

While a process holds a mutex whose previous owner died holding it, ``previous_owner_died``
is True and ``dead_owner_pid`` names the dead owner: the data the mutex guards may be
half-updated.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from types import TracebackType
from typing import Any

import posix_ipc
import sysv_ipc

from . import errors
from ._common import on_creator_exit
from ._identity import IDENTITY, token_alive, token_pid
from ._libc import sem_member_exists
from ._names import check_backend
from ._posix import PosixSemaphore, open_posix_shm, unlink_posix_shm
from ._sysv import IPC_NOWAIT, SEM_UNDO, SysvSemaphore, open_sysv_shm, semop
from ._timeouts import Deadline, check_timeout
from .semaphore import _open_sem

__all__ = ["ROBUST_SLICE", "Mutex", "companion_lock"]

ROBUST_SLICE = 0.05  # seconds a posix waiter sleeps before checking for a dead owner
_STATE_SIZE = mmap.PAGESIZE
# Where a named mutex keeps its owner word, apart from any segment the user names alike:
OWNER_SUFFIX = ".owner"  # posix: the shm object "<name>.owner"
OWNER_KEY_FLIP = 0x80 << 24  # sysv: key ftok(path, proj ^ 0x80), the top byte being proj
_PHP_GUARD_WAIT = 10.0  # seconds to wait for PHP's sem_get init guard
_SPINS = 200 if (os.cpu_count() or 1) > 1 else 0
_ident = IDENTITY  # one global load + one slot load on the fast path


class Mutex:
    """A binary lock owned by one process at a time, released by the kernel or by the next
    waiter when its holder dies.

    ``Mutex()`` is anonymous (share it through ``fork``); ``Mutex(name)`` is named, as for
    :class:`Semaphore`.  Opening a SysV semaphore set that another program made (PHP's
    ``sem_get``) works too: its first member is the lock; since such a set has no owner
    word, ``owner`` then comes from the kernel's last-operation pid and owner death is not
    reported (the kernel still releases it).

    Raises as :class:`Semaphore` does for bad names, foreign or missing objects.
    """

    __slots__ = (
        "__weakref__",
        "_fd",
        "_finalizer",
        "_foreign",
        "_held",
        "_owner",
        "_php_user",
        "_raw_acquire",
        "_raw_release",
        "_sem",
        "_state",
        "_what",
        "backend",
        "name",
    )

    def __new__(cls, name: str | os.PathLike[str] | None = None, *, backend: str = "posix",
                **options: Any) -> Mutex:
        if cls is Mutex:
            check_backend(backend)
            cls = _PosixMutex if backend == "posix" else _SysvMutex
        return object.__new__(cls)

    def __init__(
        self,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        self.backend = backend
        self.name = None if name is None else os.fspath(name)
        self._held: int = 0
        self._sem = _open_sem("Mutex", 1, name, backend=backend, create=create,
                              exclusive=exclusive, allow_foreign=allow_foreign, proj=proj,
                              undo=True)
        self._what = self._sem.what
        self._fd = -1
        self._foreign = False
        self._php_user = 0
        try:
            self._state: Any = self._open_state(create or self._sem.created, allow_foreign)
        except BaseException:
            self._drop_sem()
            raise
        self._owner = memoryview(self._state).cast("Q")
        raw = self._sem.raw
        self._raw_acquire = raw.acquire
        self._raw_release = raw.release
        self._finalizer = on_creator_exit(self, _remove_anonymous, self._sem)
        if not (self._sem.created and self._sem.anonymous):
            self._finalizer.detach()

    def _open_state(self, create: bool, allow_foreign: bool) -> Any:
        """Open the shared word holding the owner's token (same name/key as the semaphore)."""
        sem = self._sem
        if isinstance(sem, PosixSemaphore):
            name = sem.name if sem.anonymous else sem.name + OWNER_SUFFIX
            self._fd, _, _ = open_posix_shm(name, _STATE_SIZE, create=create, exclusive=False,
                                            allow_foreign=allow_foreign, what=self._what,
                                            track=not sem.anonymous)
            if sem.anonymous:
                posix_ipc.unlink_shared_memory(name)
            return mmap.mmap(self._fd, _STATE_SIZE)
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
        """
        assert isinstance(self._sem, SysvSemaphore)  # only sysv sets come from PHP
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
        if self._php_user == _ident.pid and isinstance(self._sem, SysvSemaphore):
            self._php_user = 0
            with contextlib.suppress(errors.IpcforkError):
                semop(self._sem.semid, [(1, -1, SEM_UNDO | IPC_NOWAIT)], 0, self._what,
                      "leave PHP users")

    def __repr__(self) -> str:
        owner = self.owner
        state = f"locked by {owner}" if owner else "unlocked"
        return f"<Mutex {self._what} {state}>"

    # -- the fast paths live in the backend subclasses below ----------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the mutex; True if taken, False if ``timeout`` seconds passed first.

        A mutex is not re-entrant: acquiring it again from the holding process waits.
        Raises InvalidArgumentError for a negative timeout or one given with
        ``blocking=False``; signals arriving while waiting run their handlers and the wait
        goes on with the time remaining.
        """
        raise NotImplementedError  # pragma: no cover - replaced in each backend

    def release(self) -> None:
        """Give the mutex back.

        Raises NotOwnerError when this process does not hold it (including a forked child
        of the holder).
        """
        if self._held is not _ident.token:  # identity: the fast check; _not_owner re-checks
            self._not_owner()
        self._held = self._owner[0] = 0
        self._raw_release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # release() inlined: a second Python call would cost as much as the release itself.
        if self._held is not _ident.token:
            self._not_owner()
        self._held = self._owner[0] = 0
        self._raw_release()

    # -- slow paths ---------------------------------------------------------------------

    @property
    def previous_owner_died(self) -> bool:
        """True while this process holds the mutex and its previous holder died holding it."""
        return type(self._held) is _Recovered

    @property
    def dead_owner_pid(self) -> int | None:
        """The pid of the holder that died, while :attr:`previous_owner_died` is True."""
        held = self._held
        return held.dead_pid if type(held) is _Recovered else None

    def _acquire_contended(self, blocking: bool, timeout: float | None) -> bool:
        if self._state is None:
            raise errors.ObjectClosedError(f"{self._what} is closed in this process",
                                           obj=self._what, backend=self.backend)
        timeout = check_timeout(timeout)
        if not blocking:
            if timeout is not None:
                raise errors.InvalidArgumentError("a timeout makes no sense with blocking=False")
            if self._sem.try_acquire():
                self._took()
                return True
            return self.backend == "posix" and self._take_over_dead_owner()
        if self.backend == "sysv":
            if not (self._sem.try_acquire() or self._sem.acquire_slow(timeout)):
                return False
            self._took()
            return True
        if timeout != 0 and self._spin():
            return True
        deadline = Deadline(timeout)
        while True:
            remaining = deadline.remaining()
            wait = ROBUST_SLICE if remaining is None else min(remaining, ROBUST_SLICE)
            if self._sem.acquire_slow(wait):
                self._took()
                return True
            if self._take_over_dead_owner():
                return True
            if deadline.expired():
                return False

    def _spin(self) -> bool:
        """Briefly poll the semaphore before sleeping (posix only).

        Critical sections are usually shorter than a sleep and wake-up, and on a multi-core
        machine the holder is running right now: watching the value (a plain read of shared
        memory in glibc) and retrying when it turns positive beats a futex sleep.
        """
        raw = self._sem.raw
        for _ in range(_SPINS):
            if raw.value > 0:
                try:
                    raw.acquire(0.0)
                except posix_ipc.BusyError:
                    continue
                self._took()
                return True
        return False

    def _took(self) -> None:
        """Record this process as the holder after taking the semaphore."""
        owner = self._owner
        previous = owner[0]
        if previous and self.backend == "sysv":
            # A clean release zeroes the word first: a token left here is a dead holder's.
            self._held = _Recovered(_ident.token, previous)
        else:
            self._held = _ident.token
        owner[0] = _ident.token

    def _take_over_dead_owner(self) -> bool:
        """If the recorded holder is dead, become the holder (posix only)."""
        token = self._owner[0]
        if token == 0 or token_alive(token):
            return False
        # lockf locks are per process and dropped by the kernel on death: a safe referee.
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if self._owner[0] != token:
                return False  # another waiter took over first
            self._owner[0] = _ident.token
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._held = _Recovered(_ident.token, token)
        return True

    def _give_back(self) -> None:
        """Release a semaphore taken by a fast path that then failed (a raising signal
        handler, or a handle closed meanwhile)."""
        with contextlib.suppress(Exception):  # the owner word may be unmapped (closed)
            self._held = self._owner[0] = 0
        self._raw_release()

    def _not_owner(self) -> None:
        if self._held == _ident.token:
            return  # a recovered holding (an equal int, not the same object)
        holder = self.owner
        raise errors.NotOwnerError(
            f"{self._what} is held by "
            + (f"pid {holder}" if holder else "nobody")
            + f", not by this process (pid {_ident.pid}); only the holder may release it",
            obj=self._what,
            backend=self.backend,
        )

    # -- queries and lifetime -----------------------------------------------------------

    @property
    def owner(self) -> int | None:
        """The pid of the holder, or None when unlocked (a snapshot)."""
        token = self._owner[0]
        if token:
            return token_pid(token)
        if self._foreign and isinstance(self._sem, SysvSemaphore) and self._sem.value == 0:
            return self._sem.last_pid
        return None

    def locked(self) -> bool:
        """True if some process holds the mutex (a snapshot)."""
        return self._sem.value == 0

    def _drop_sem(self) -> None:
        if self._sem.created:
            with contextlib.suppress(errors.IpcforkError):
                if isinstance(self._sem, SysvSemaphore) or not self._sem.anonymous:
                    self._sem.unlink()
        self._sem.close()

    def close(self) -> None:
        """Drop this process's handle (an anonymous SysV mutex is removed by its creator)."""
        if self._state is None:
            return
        self._finalizer()
        self._leave_php_users()
        self._owner.release()
        if isinstance(self._state, mmap.mmap):
            self._state.close()
            os.close(self._fd)
        elif not self._foreign:
            with contextlib.suppress(sysv_ipc.Error):
                self._state.detach()
        self._state = None
        self._sem.close()

    def unlink(self) -> None:
        """Remove a named mutex system-wide.  Raises ObjectNotFoundError if already gone."""
        if isinstance(self._sem, PosixSemaphore):
            if not self._sem.anonymous:
                with contextlib.suppress(errors.ObjectNotFoundError):
                    unlink_posix_shm(self._sem.name + OWNER_SUFFIX, self._what)
        elif not self._sem.anonymous and not self._foreign:
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


class _Recovered(int):
    """This process's token, marking a holding whose previous owner died."""

    dead_pid: int

    def __new__(cls, token: int, dead_token: int) -> _Recovered:
        self = super().__new__(cls, token)
        self.dead_pid = token_pid(dead_token)
        return self


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


def _remove_anonymous(sem: PosixSemaphore | SysvSemaphore) -> None:
    if isinstance(sem, SysvSemaphore):
        with contextlib.suppress(errors.IpcforkError):
            sem.unlink()


class _PosixMutex(Mutex):
    """The posix backend's fast paths: ``sem_trywait`` and one owner-word write."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if timeout is not None:
            return self._acquire_contended(blocking, timeout)  # validates, then tries first
        try:
            self._raw_acquire(0.0)
            self._owner[0] = self._held = _ident.token
        except posix_ipc.Error:
            return self._acquire_contended(blocking, timeout)
        except BaseException:
            # A signal handler raised (Ctrl-C) right after the semaphore was taken: give it
            # back, or it would stay held with no owner recorded.  (sem_trywait itself never
            # runs handlers, so reaching here means we took it.)
            self._give_back()
            raise
        return True

    acquire.__doc__ = Mutex.acquire.__doc__
    __enter__ = acquire


class _SysvMutex(Mutex):
    """The sysv backend's fast path: one blocking ``semop`` with SEM_UNDO."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if blocking and timeout is None:
            try:
                self._raw_acquire()
                owner = self._owner
                if owner[0]:
                    self._took()  # the previous holder died holding it
                else:
                    owner[0] = self._held = _ident.token
            except sysv_ipc.Error:  # interrupted by a signal, or removed: the slow path sorts
                return self._acquire_contended(blocking, timeout)
            except BaseException:  # a handler raised just after the semop: give it back
                self._give_back()
                raise
            return True
        return self._acquire_contended(blocking, timeout)

    acquire.__doc__ = Mutex.acquire.__doc__
    __enter__ = acquire
