"""Thin adapter over sysv_ipc: safe create-or-open, owner checks, timeouts, EINTR retry.

Sharp edges handled here (measured, see docs/design.md):

* The sysv_ipc Linux wheel is built without ``semtimedop``, so ``acquire(timeout=...)`` blocks
  forever.  Timed waits call ``semtimedop`` from libc through ctypes (``_libc``) on the
  semaphore id; the kernel wakes us on the release or the deadline, with no polling.
* ``Semaphore(key, IPC_CREAT, initial_value=v)`` resets the value of an existing semaphore.
  We create exclusively and, on EEXIST, open without touching the value.  A creator marks a
  semaphore initialised by operating on it once (``sem_otime`` != 0, as in Stevens), and an
  opener waits briefly for that before use.
* A signal during a blocking call makes sysv_ipc raise; we retry with the time remaining.
"""

from __future__ import annotations

import time
from typing import Any

import sysv_ipc

from . import _registry
from ._common import kernel_limit
from ._libc import WAIT_DONE, WAIT_INTERRUPTED, semtimedop
from ._security import CREATE_MODE, check_owner
from ._timeouts import Deadline
from ._translate import translate_exception, translating
from .errors import (
    InvalidArgumentError,
    LimitExceededError,
    ObjectExistsError,
)

__all__ = [
    "IPC_NOWAIT", "SEMVMX", "SEM_UNDO", "SysvSemaphore", "open_sysv_queue", "open_sysv_shm",
    "remove_sysv", "semop",
]

SEMVMX: int = sysv_ipc.SEMAPHORE_VALUE_MAX


MSGMAX: int = kernel_limit("/proc/sys/kernel/msgmax", 8192)
SEM_UNDO = 0x1000
IPC_NOWAIT = 0o4000
_INIT_WAIT = 2.0  # seconds an opener waits for a creator to finish initialising

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
    """Member 0 of a SysV semaphore set, with safe opening, timeouts and EINTR retry."""

    __slots__ = ("anonymous", "created", "key", "raw", "undo_flag", "what")

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
        self.created = False
        self.undo_flag = SEM_UNDO if undo else 0
        raw = None
        if create or self.anonymous:
            try:
                with translating(what, "sysv", "create"):
                    raw = sysv_ipc.Semaphore(self.key, sysv_ipc.IPC_CREX, mode=CREATE_MODE)
            except ObjectExistsError:
                if exclusive:
                    raise
            else:
                self.created = True
                _registry.remember("sysv", "semaphore", str(raw.id), key=self.key)
                # Set the value and stamp sem_otime in one operation, marking it initialised.
                with translating(what, "sysv", "initialise"):
                    if initial:
                        raw.release(initial)
                    else:
                        raw.Z()
        if raw is None:
            with translating(what, "sysv", "open"):
                raw = sysv_ipc.Semaphore(self.key)
            check_owner(raw.uid, raw.mode, what, "sysv", allow_foreign=allow_foreign,
                        creator_uid=raw.cuid)
            self._wait_initialised(raw)
        raw.undo = bool(undo)
        self.raw: Any = raw

    def _wait_initialised(self, raw: Any) -> None:
        # A creator may still be between semget and its first semop; see module docstring.
        end = time.monotonic() + _INIT_WAIT
        while raw.o_time == 0 and time.monotonic() < end:
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
        """Take one unit without blocking; False if none is free."""
        raw = self.raw
        raw.block = False
        try:
            raw.acquire()
            return True
        except sysv_ipc.BusyError:
            return False
        except sysv_ipc.Error as exc:
            raise translate_exception(exc, self.what, "sysv", "acquire") from exc
        finally:
            raw.block = True

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
        """Nothing to release per process: SysV semaphores have no per-process handle."""

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
    if create or anonymous:
        try:
            with translating(what, "sysv", "create"):
                raw = factory(real_key, sysv_ipc.IPC_CREX, mode=CREATE_MODE, **create_args,
                              **(open_args or {}))
        except ObjectExistsError:
            if exclusive:
                raise
        else:
            if not anonymous or kind == "queue":
                _registry.remember("sysv", kind, str(raw.id), key=real_key)
            return raw, True
    with translating(what, "sysv", "open"):
        raw = factory(real_key, **(open_args or {}))
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
