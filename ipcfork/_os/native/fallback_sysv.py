"""The ctypes twin of ``_core.SysvLockCore`` (see ``sysvlock.c``): the SysV Mutex's hot paths
in Python, with the same state and behaviour.

Unlike the C methods, these Python methods have bytecode boundaries where a raising signal
handler can run: at the start of ``release`` (before the semaphore is given back) and
between a successful semop and ``_took`` (the lock taken, no holder recorded).  The
compiled path has no such windows.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

from ...errors import (
    BufferInUseError,
    InvalidArgumentError,
    ObjectClosedError,
    ObjectNotFoundError,
)
from ..libc import WAIT_DONE, semtimedop
from ..timeouts import check_timeout

__all__ = ["SysvLockCore"]

_SEM_UNDO, _IPC_NOWAIT = 0x1000, 0o4000
_SLICE = 0.02  # seconds: a waiter runs Python signal handlers at least this often
_process = {"pid": 0, "token": 0}  # kept in step by fallback.set_identity


class SysvLockCore:
    """The SysV Mutex's hot paths; see ``sysvlock.c``."""

    __slots__ = ("_core_owner", "_dead_token", "_holder_pid", "_recovered", "_semid",
                 "_sysv_what", "_waiting")

    _core_owner: memoryview | None
    _dead_token: int
    _holder_pid: int
    _recovered: bool
    _semid: int
    _sysv_what: str
    _waiting: set[tuple[int, int]]  # (pid, thread ident) of each thread waiting here

    def __new__(cls, *args: Any, **kwargs: Any) -> SysvLockCore:
        self = object.__new__(cls)
        self._core_owner, self._semid, self._holder_pid = None, -1, 0
        self._recovered, self._dead_token, self._sysv_what = False, 0, "Mutex (sysv)"
        self._waiting = set()  # add and discard are atomic under the GIL
        return self

    def _sysv_bind(self, semid: int, buffer: Any, what: str) -> None:
        view = memoryview(buffer)
        if view.readonly or view.nbytes < 8:
            view.release()
            raise InvalidArgumentError(f"{what}: the owner word needs 8 aligned bytes",
                                       obj=what, backend="sysv")
        self._core_owner = view[:8].cast("Q")
        view.release()
        self._semid, self._sysv_what, self._holder_pid = semid, what, 0

    def _sysv_unbind(self) -> None:
        if self._core_owner is not None:
            me = _process["pid"]
            if any(pid == me for pid, _ in list(self._waiting)):
                raise BufferInUseError(
                    f"{self._sysv_what} is being waited for by a thread of this process: it "
                    "cannot be closed under that wait", obj=self._sysv_what, backend="sysv")
            if self._held_now():
                raise BufferInUseError(
                    f"{self._sysv_what} is held by this process: release it before closing",
                    obj=self._sysv_what, backend="sysv")
            self._core_owner.release()
            self._core_owner = None

    def _word(self) -> memoryview:
        if self._core_owner is None:
            raise ObjectClosedError(f"{self._sysv_what} is closed in this process",
                                    obj=self._sysv_what, backend="sysv")
        return self._core_owner

    def _took(self) -> None:
        word = self._word()
        previous = word[0]
        self._recovered, self._dead_token = previous != 0, previous
        word[0] = _process["token"]
        self._holder_pid = _process["pid"]

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As the compiled ``SysvLockCore.acquire``."""
        self._word()
        if timeout is not None and not blocking:
            raise InvalidArgumentError("a timeout makes no sense with blocking=False",
                                       obj=self._sysv_what, backend="sysv")
        seconds = check_timeout(timeout)
        if self._semop(_SEM_UNDO | _IPC_NOWAIT, None):
            return True
        if not blocking or seconds == 0:
            return False
        deadline = None if seconds is None else time.monotonic() + seconds
        me = (_process["pid"], threading.get_ident())
        while True:
            left = _SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._waiting.add(me)  # _sysv_unbind refuses meanwhile
            try:
                if self._semop(_SEM_UNDO, min(left, _SLICE)):
                    return True
            finally:
                self._waiting.discard(me)
            self._word()  # a slice ended or a handler ran (and did not raise); closed since?

    def _semop(self, flags: int, timeout: float | None) -> bool:
        """One take attempt; True (and recorded) if it took the lock."""
        try:
            outcome = semtimedop(self._semid, [(0, -1, flags)], timeout)
        except OSError as exc:
            if exc.errno in (errno.EIDRM, errno.EINVAL):
                raise ObjectNotFoundError(
                    f"{self._sysv_what} was removed (semaphore set id {self._semid})",
                    obj=self._sysv_what, backend="sysv") from exc
            raise
        if outcome == WAIT_DONE:
            self._took()
            return True
        return False

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        """As the compiled ``SysvLockCore.release``."""
        word = self._word()
        if self._holder_pid != _process["pid"] or not self._holder_pid:
            self._not_owner()  # type: ignore[attr-defined]
        self._holder_pid, self._recovered, self._dead_token = 0, False, 0
        word[0] = 0
        semtimedop(self._semid, [(0, 1, _SEM_UNDO | _IPC_NOWAIT)], 0)

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _held_now(self) -> bool:
        return bool(self._holder_pid) and self._holder_pid == _process["pid"]

    @property
    def _held_here(self) -> bool:
        return self._held_now()

    @property
    def previous_owner_died(self) -> bool:
        """True while this process holds the mutex and its previous holder died holding it."""
        return self._held_now() and self._recovered

    @property
    def dead_owner_pid(self) -> int | None:
        """The pid of the holder that died, while previous_owner_died is True."""
        return self._dead_token & 0xFFFFFFFF if self.previous_owner_died else None
