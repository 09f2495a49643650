"""Thin adapter over sysv_ipc: safe create-or-open, owner checks, timeouts, EINTR retry.

Sharp edges handled here (measured, see docs/design.md):

* The sysv_ipc Linux wheel is built without ``semtimedop``, so ``acquire(timeout=...)`` blocks
  forever.  Timed waits call ``semtimedop`` from libc through ctypes (``_libc``) on the
  semaphore id; the kernel wakes us on the release or the deadline, with no polling.
* ``Semaphore(key, IPC_CREAT, initial_value=v)`` resets the value of an existing semaphore.
  We create exclusively and, on EEXIST, open without touching the value.  A creator marks a
  semaphore initialised by operating on it once (``sem_otime`` != 0, as in Stevens), and an
  opener waits briefly for that before use, and refuses the set if it never comes.
* PHP's ``sem_get`` asks ``semget`` for three members (the value, a usage count, an init
  guard) and fails with EINVAL on sysv_ipc's one-member sets.  Named sets are made with
  three members (``semget`` through ctypes), and every ipcfork process using one takes
  part in PHP's protocol: under the guard (wait for zero, raise it) it adds one to the
  usage count with SEM_UNDO, and takes it back on close.  PHP resets the value whenever
  ``sem_get`` finds no other user, so counting ourselves keeps it from resetting a lock
  we hold.  The creator sets the value only if it is the only user.
* ``try_acquire`` is one ``semop`` with IPC_NOWAIT through ctypes: flipping the shared
  sysv_ipc object's ``block`` attribute would race with other threads.
* A signal during a blocking call makes sysv_ipc raise; we retry with the time remaining.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import sysv_ipc

from .._common import kernel_limit
from ..errors import (
    InvalidArgumentError,
    IpcforkError,
    LimitExceededError,
    ObjectCorruptError,
    ObjectExistsError,
    WaitTimeoutError,
)
from . import registry as _registry
from .identity import IDENTITY
from .libc import (
    WAIT_DONE,
    WAIT_INTERRUPTED,
    sem_getval,
    sem_member_exists,
    semget,
    semtimedop,
)
from .opening import create_or_open
from .security import CREATE_MODE, check_owner
from .timeouts import Deadline
from .translate import translate_exception, translating

__all__ = [
    "IPC_NOWAIT", "PHP_NSEMS", "SEMVMX", "SEM_UNDO", "SysvSemaphore", "open_sysv_queue",
    "open_sysv_shm", "remove_sysv", "semop",
]

SEMVMX: int = sysv_ipc.SEMAPHORE_VALUE_MAX


MSGMAX: int = kernel_limit("/proc/sys/kernel/msgmax", 8192)
SEM_UNDO = 0x1000
IPC_NOWAIT = 0o4000
_INIT_WAIT = 2.0  # seconds an opener waits for a creator to finish initialising
# PHP's sem_get layout, which named sets get so PHP can join them: member 0 is the value,
# member 1 counts the processes using the set, member 2 guards initialisation.
PHP_NSEMS, _USAGE, _GUARD = 3, 1, 2
_GUARD_WAIT = 10.0  # seconds to wait for another user's init guard (held only briefly)

def semop(semid: int, ops: list[tuple[int, int, int]], timeout: float | None, what: str,
          op: str) -> bool:
    """Apply ``ops`` atomically within ``timeout`` seconds; False if the time ran out.

    Signals are retried with the time remaining.  Raises ipcfork errors (ObjectNotFoundError
    if the set was removed meanwhile).
    """
    deadline = Deadline(timeout)
    while True:
        try:
            outcome = semtimedop(semid, ops, deadline.remaining())
        except OSError as exc:
            raise translate_exception(exc, what, "sysv", op) from exc
        if outcome != WAIT_INTERRUPTED:
            return outcome == WAIT_DONE


class SysvSemaphore:
    """Member 0 of a SysV semaphore set, with safe opening, timeouts and EINTR retry.

    A named set is made in PHP's ``sem_get`` layout (see the module docstring), and every
    process that creates or opens one in that layout counts itself among its users until
    :meth:`close`.  With ``hold_guard`` the creator keeps the set's init guard until
    :meth:`release_guard`, so that openers wait for what it makes next (a Mutex's owner
    word).
    """

    __slots__ = ("anonymous", "created", "guard_held", "joined", "key", "php_layout", "raw",
                 "undo_flag", "what")

    def __init__(
        self,
        key: int | None,
        initial: int,
        *,
        create: bool,
        exclusive: bool,
        allow_foreign: bool,
        undo: bool,
        what: str,
        hold_guard: bool = False,
    ) -> None:
        if not 0 <= initial <= SEMVMX:
            raise InvalidArgumentError(
                f"initial value {initial} is out of range for {what}",
                obj=what,
                backend="sysv",
                limit=f"0..{SEMVMX} (SEMVMX)",
            )
        self.what = what
        self.anonymous = key is None
        self.key = sysv_ipc.IPC_PRIVATE if key is None else key
        self.undo_flag = SEM_UNDO if undo else 0
        self.joined = 0  # the pid that counted itself among the users (PHP's layout)
        self.guard_held = False
        raw, self.created = create_or_open(
            self._create, lambda: sysv_ipc.Semaphore(self.key), creating=create or self.anonymous,
            exclusive=exclusive, what=what, backend="sysv")
        if self.created:
            _registry.remember("sysv", "semaphore", str(raw.id), key=self.key)
            try:
                self._initialise(raw, initial, hold_guard)
            except BaseException:
                with contextlib.suppress(sysv_ipc.Error):
                    raw.remove()
                _registry.forget("sysv", "semaphore", str(raw.id))
                raise
        else:
            check_owner(raw.uid, raw.mode, what, "sysv", allow_foreign=allow_foreign,
                        creator_uid=raw.cuid)
            self._wait_initialised(raw)
            self.php_layout = sem_member_exists(raw.id, _GUARD)
            if self.php_layout:
                self._join(raw, None)
                self.release_guard(raw)
        raw.undo = bool(undo)
        self.raw: Any = raw

    def _create(self) -> Any:
        """Make the set: one member if anonymous, else PHP's three (zeroed by the kernel)."""
        self.php_layout = not self.anonymous
        if self.anonymous:
            return sysv_ipc.Semaphore(self.key, sysv_ipc.IPC_CREX, mode=CREATE_MODE)
        semid = semget(self.key, PHP_NSEMS, sysv_ipc.IPC_CREX | CREATE_MODE)
        raw = sysv_ipc.Semaphore(self.key)  # member 0 of the set just made
        if raw.id != semid:  # removed and made again by someone else in between
            raise ObjectExistsError(f"{self.what} was replaced while being created",
                                    obj=self.what, backend="sysv")
        return raw

    def _initialise(self, raw: Any, initial: int, hold_guard: bool) -> None:
        """Set the new set's value, stamping ``sem_otime`` (openers wait for the stamp)."""
        if not self.php_layout:
            with translating(self.what, "sysv", "initialise"):
                if initial:
                    raw.release(initial)  # one semop: the value and the stamp
                else:
                    raw.Z()
            return
        self._join(raw, initial)  # its semop stamps sem_otime
        if not hold_guard:
            self.release_guard(raw)

    def _join(self, raw: Any, initial: int | None) -> None:
        """Count this process among the users of a set in PHP's layout, as ``sem_get`` does:
        wait for the init guard (member 2) to be zero and raise it while adding one to the
        usage count (member 1), both with SEM_UNDO so a SIGKILL undoes our share.  With
        ``initial`` (the creator), set the value if we are the only user (PHP set it if it
        came first and still uses it).  The guard stays held: :meth:`release_guard`.

        Raises WaitTimeoutError if another user holds the guard for ``_GUARD_WAIT`` s.
        """
        if not semop(raw.id, [(_GUARD, 0, 0), (_GUARD, 1, SEM_UNDO), (_USAGE, 1, SEM_UNDO)],
                     _GUARD_WAIT, self.what, "join the users of"):
            raise WaitTimeoutError(
                f"{self.what}: its init guard (member {_GUARD}, PHP's sem_get protocol) "
                f"stayed taken for {_GUARD_WAIT} s", obj=self.what, backend="sysv",
                limit=f"{_GUARD_WAIT} s")
        self.guard_held = True
        self.joined = IDENTITY.pid
        if initial is not None:
            with translating(self.what, "sysv", "initialise"):
                if sem_getval(raw.id, _USAGE) == 1:
                    raw.value = initial

    def release_guard(self, raw: Any = None) -> None:
        """Lower the init guard this process holds (openers and PHP wait for it)."""
        if self.guard_held:
            self.guard_held = False
            semop((raw or self.raw).id, [(_GUARD, -1, SEM_UNDO)], None, self.what,
                  "initialise")

    def _wait_initialised(self, raw: Any) -> None:
        """Wait up to ``_INIT_WAIT`` s for the creator's first ``semop`` (see the module
        docstring).  Raises ObjectCorruptError naming the object and the limit if it never
        comes (a creator that died between ``semget`` and its first ``semop``, or a set
        made by a program that never operated on it)."""
        end = time.monotonic() + _INIT_WAIT
        while raw.o_time == 0:
            if time.monotonic() >= end:
                raise ObjectCorruptError(
                    f"{self.what} (semaphore set id {raw.id}) was never initialised: no "
                    f"semop on it within {_INIT_WAIT} s of opening (its creator died while "
                    "creating it, or made it without operating on it); remove it "
                    "(ipcrm -s) or initialise it with a semop",
                    obj=self.what, backend="sysv", limit=f"{_INIT_WAIT} s for initialisation")
            time.sleep(0.001)

    @property
    def semid(self) -> int:
        return int(self.raw.id)

    def acquire(self, blocking: bool, timeout: float | None) -> bool:
        """Take one unit, blocking in one ``semop`` when no timeout is set."""
        if blocking and timeout is None:
            try:
                self.raw.acquire()
                return True
            except sysv_ipc.Error:
                return self.acquire_slow(None)  # interrupted, or an error to translate
        if self.try_acquire():
            return True
        return blocking and self.acquire_slow(timeout)

    def try_acquire(self) -> bool:
        """Take one unit without blocking; False if none is free.

        One ``semop`` with IPC_NOWAIT: it touches no attribute of the shared sysv_ipc
        object (whose ``block`` flag other threads' blocking acquires read), so threads may
        try and block on one semaphore at once.  Raises ObjectNotFoundError if removed.
        """
        return semop(self.semid, [(0, -1, self.undo_flag | IPC_NOWAIT)], None, self.what,
                     "acquire")

    def acquire_slow(self, timeout: float | None) -> bool:
        """Block until acquired or ``timeout`` passes; retried across signals."""
        if timeout is not None:
            return semop(self.semid, [(0, -1, self.undo_flag)], timeout, self.what, "acquire")
        while True:
            try:
                self.raw.acquire()
                return True
            except sysv_ipc.Error as exc:
                if "Signaled" in str(exc):
                    continue  # the handler has run; it did not raise
                raise translate_exception(exc, self.what, "sysv", "acquire") from exc

    def release(self, n: int = 1) -> None:
        try:
            self.raw.release(n)
        except (sysv_ipc.Error, ValueError) as exc:
            if self.raw.value + n > SEMVMX:
                raise LimitExceededError(
                    f"releasing {n} would take {self.what} past its maximum value",
                    obj=self.what,
                    backend="sysv",
                    limit=f"value <= {SEMVMX} (SEMVMX)",
                ) from exc
            raise translate_exception(exc, self.what, "sysv", "release") from exc

    @property
    def value(self) -> int:
        with translating(self.what, "sysv", "value"):
            return int(self.raw.value)

    @property
    def last_pid(self) -> int:
        with translating(self.what, "sysv", "last_pid"):
            return int(self.raw.last_pid)

    def close(self) -> None:
        """Stop counting among the users of a set in PHP's layout (only the process that
        joined: its SEM_UNDO adjustments are its own).  SysV semaphores have no other
        per-process handle."""
        if self.joined != IDENTITY.pid:
            return
        self.joined = 0
        with contextlib.suppress(IpcforkError):
            self.release_guard()
            semop(self.semid, [(_USAGE, -1, SEM_UNDO | IPC_NOWAIT)], None, self.what,
                  "leave the users of")

    def unlink(self) -> None:
        semid = self.semid
        try:
            with translating(self.what, "sysv", "remove"):
                self.raw.remove()
        finally:
            _registry.forget("sysv", "semaphore", str(semid))


def _wrap_open(
    factory: Any, key: int | None, kind: str, *, create: bool, exclusive: bool,
    allow_foreign: bool, what: str, open_args: dict[str, Any] | None = None,
    **create_args: Any,
) -> tuple[Any, bool]:
    """Create-or-open a SysV shm segment or queue: ``(raw, created)``."""
    anonymous = key is None
    real_key = sysv_ipc.IPC_PRIVATE if anonymous else key
    both_args = open_args or {}  # open_args go to both calls, create_args to create only
    raw, created = create_or_open(
        lambda: factory(real_key, sysv_ipc.IPC_CREX, mode=CREATE_MODE, **create_args,
                        **both_args),
        lambda: factory(real_key, **both_args), creating=create or anonymous,
        exclusive=exclusive, what=what, backend="sysv")
    if created:
        if not anonymous or kind == "queue":
            _registry.remember("sysv", kind, str(raw.id), key=real_key)
        return raw, True
    try:
        check_owner(raw.uid, raw.mode, what, "sysv", allow_foreign=allow_foreign,
                    creator_uid=raw.cuid)
    except BaseException:
        if kind == "shm":
            raw.detach()  # sysv_ipc attaches on open; do not keep a refused segment mapped
        raise
    return raw, False


def open_sysv_shm(
    key: int | None, size: int | None, *, create: bool, exclusive: bool,
    allow_foreign: bool, what: str,
) -> tuple[Any, bool]:
    """Create or open (and attach) a SysV segment; anonymous ones are marked for removal."""
    args: dict[str, Any] = {}
    if create or exclusive or key is None:
        if size is None:
            raise InvalidArgumentError(f"creating {what} needs a size", obj=what, backend="sysv")
        args["size"] = size
    args["init_character"] = b"\0"  # sysv_ipc fills new segments with spaces otherwise
    raw, created = _wrap_open(sysv_ipc.SharedMemory, key, "shm", create=create,
                              exclusive=exclusive, allow_foreign=allow_foreign, what=what, **args)
    if key is None:
        # IPC_RMID while attached: the segment lives until the family's last detach.
        raw.remove()
    return raw, created


def open_sysv_queue(
    key: int | None, *, create: bool, exclusive: bool, allow_foreign: bool, what: str,
) -> tuple[Any, bool]:
    """Create or open a SysV message queue whose receive buffer takes the largest message
    the kernel allows (sysv_ipc's default buffer is only 2048 bytes)."""
    return _wrap_open(sysv_ipc.MessageQueue, key, "queue", create=create, exclusive=exclusive,
                      allow_foreign=allow_foreign, what=what,
                      open_args={"max_message_size": MSGMAX})


def remove_sysv(raw: Any, kind: str, what: str) -> None:
    """Remove a SysV object system-wide and drop its registry record."""
    ident = str(raw.id)
    try:
        with translating(what, "sysv", "remove"):
            raw.remove()
    finally:
        _registry.forget("sysv", kind, ident)
