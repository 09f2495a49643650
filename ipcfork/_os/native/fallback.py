"""The core's fallback where the C extension was not built (or ``IPCFORK_PURE=1``).

The same glibc ``pthread_mutex_*`` calls on the same 128-byte block as ``_core.c`` (see the
layout there), so a process on this path and one on the compiled path share a mutex
correctly; only the speed differs (each ctypes call costs about a microsecond).  Atomics
come from GCC's ``libatomic.so.1`` (see :mod:`ipcfork._os.native.libatomic`).

ctypes releases the GIL around each libc call, and a timed-out wait slice returns to Python
code, where the interpreter runs pending signal handlers: a handler that raises ends the
wait, as on the compiled path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ...errors import (
    BufferInUseError,
    DeadlockError,
    InvalidArgumentError,
    NotOwnerError,
    ObjectClosedError,
    ObjectCorruptError,
)
from ..timeouts import check_timeout
from .fallback_sysv import SysvLockCore
from .fallback_sysv import _process as _sysv_process
from .libatomic import AtomicWords

__all__ = ["BLOCK_SIZE", "AtomicWords", "CounterCore", "RobustMutex", "SysvLockCore",
           "set_identity", "set_spin"]

BLOCK_SIZE = 128
_MAGIC_WORD, _TOKEN_WORD, _RECOVERIES_WORD = 8, 9, 10  # 64-bit word indexes in the block
MUTEX_MAGIC = 0x3178746D63667069  # b"ipcfmtx1", little-endian, as in _core.c
_FUTEX_TID_MASK = 0x3FFFFFFF
_SLICE = 0.02  # seconds: a waiter runs Python signal handlers at least this often
_PTHREAD_PROCESS_SHARED, _PTHREAD_MUTEX_ROBUST, _PTHREAD_MUTEX_ERRORCHECK = 1, 1, 2
_CLOCK_MONOTONIC = time.CLOCK_MONOTONIC

_libc = ctypes.CDLL(None, use_errno=True)
_trylock = _libc.pthread_mutex_trylock
_unlock = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
_clocklock = getattr(_libc, "pthread_mutex_clocklock", None)  # glibc >= 2.30
_timedlock = _libc.pthread_mutex_timedlock
_trylock.argtypes = _unlock.argtypes = _consistent.argtypes = [ctypes.c_void_p]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_timedlock.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
if _clocklock is not None:
    _clocklock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]

_process = {"token": 0, "pid": 0}
# Mappings of mutexes dropped while a thread of this process held them: the thread's robust
# list points into them, so they must stay mapped (as _core.c's mutex_dealloc does).
_KEPT: list[Any] = []


def set_identity(token: int, pid: int) -> None:
    """The calling process's token and pid (refreshed after every fork)."""
    _process["token"], _process["pid"] = token, pid
    _sysv_process["token"], _sysv_process["pid"] = token, pid


def set_spin(spins: int) -> None:
    """Accepted for the compiled path's sake: polling through ctypes would cost more than
    the sleep it saves, so this path never spins."""
    if not 0 <= spins <= 1_000_000:
        raise InvalidArgumentError("spin count must be in 0..1000000")


class RobustMutex:
    """The ctypes twin of ``_core.RobustMutex``: same block, same methods, same errors."""

    __slots__ = (
        "_address",
        "_anchor",
        "_dead_token",
        "_holder",
        "_recovered",
        "_waiters",
        "_what",
        "_words",
    )

    _anchor: Any
    _words: memoryview | None
    _address: int
    _holder: tuple[int, int, int] | None  # (pid, thread ident, futex TID) of the holder
    _waiters: set[tuple[int, int]]  # (pid, thread ident) of each thread waiting here
    _recovered: bool
    _dead_token: int
    _what: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # as the C type: attached later by _bind

    def __new__(cls, *args: Any, **kwargs: Any) -> RobustMutex:
        self = object.__new__(cls)
        self._anchor = None
        self._words = None
        self._address = 0
        self._holder = None
        self._recovered = False
        self._dead_token = 0
        self._what = "Mutex"
        self._waiters = set()  # add and discard are atomic under the GIL
        return self

    def __del__(self) -> None:
        if self._words is not None and self._held_by_recorded_thread():
            _KEPT.append((self._anchor, self._words))

    def _held_by_recorded_thread(self) -> bool:
        holder = self._holder
        return (holder is not None and holder[0] == _process["pid"]
                and self._futex_tid() == holder[2])

    # -- binding ----------------------------------------------------------------------------

    def _bind(self, buffer: Any, offset: int, create: bool, what: str) -> bool:
        if self._words is not None:
            raise RuntimeError("this handle is bound already")
        self._what = what
        view = memoryview(buffer)
        if (view.readonly or offset < 0 or view.nbytes < BLOCK_SIZE
                or offset > view.nbytes - BLOCK_SIZE):
            view.release()
            raise InvalidArgumentError(
                f"{what}: a mutex block needs {BLOCK_SIZE} bytes at an 8-byte aligned offset; "
                f"offset {offset} of a {len(buffer)}-byte buffer does not fit", obj=what,
                backend="posix")
        words = view[offset:offset + BLOCK_SIZE].cast("Q")
        view.release()
        anchor = ctypes.c_char.from_buffer(words)  # keeps the buffer exported while bound
        address = ctypes.addressof(anchor)
        if address % 8:
            del anchor
            words.release()
            raise InvalidArgumentError(f"{what}: the mutex block is not 8-byte aligned",
                                       obj=what, backend="posix")
        if create:
            attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes
            calls: tuple[Callable[[], int], ...] = (
                lambda: _libc.pthread_mutexattr_init(attr),
                lambda: _libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
                lambda: _libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
                lambda: _libc.pthread_mutexattr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK),
            )
            rc = 0
            for call in calls:
                rc = rc or call()
            if rc == 0:
                ctypes.memset(address, 0, BLOCK_SIZE)
                rc = _libc.pthread_mutex_init(ctypes.c_void_p(address), attr)
            _libc.pthread_mutexattr_destroy(attr)
            if rc:
                del anchor
                words.release()
                raise OSError(rc, f"{what}: initialise failed: {os.strerror(rc)}")
            words[_MAGIC_WORD] = MUTEX_MAGIC  # last: openers wait for it
        else:
            seen = words[_MAGIC_WORD]
            if seen != MUTEX_MAGIC:
                del anchor
                words.release()
                if seen == 0:
                    return False
                raise ObjectCorruptError(f"{what} does not hold an ipcfork mutex (bad magic)",
                                         obj=what, backend="posix")
        self._anchor, self._words, self._address = anchor, words, address
        self._holder = None
        return True

    def _unbind(self) -> None:
        if self._words is None:
            return
        if self._held_by_recorded_thread():
            raise BufferInUseError(
                f"{self._what} is held by a thread of this process: release it before closing",
                obj=self._what, backend="posix")
        if any(pid == _process["pid"] for pid, _ in list(self._waiters)):
            raise BufferInUseError(
                f"{self._what} is being waited for by a thread of this process: it cannot be "
                "closed under that wait", obj=self._what, backend="posix")
        self._anchor = None  # its export first, or the view could not be released
        self._words.release()
        self._words, self._address = None, 0

    def _block(self) -> memoryview:
        if self._words is None:
            raise ObjectClosedError(f"{self._what} is closed in this process", obj=self._what,
                                    backend="posix")
        return self._words

    def _futex_tid(self) -> int:
        return self._block()[0] & 0xFFFFFFFF & _FUTEX_TID_MASK

    # -- taking and giving back -----------------------------------------------------------

    def _took(self, rc: int) -> None:
        words = self._block()
        if rc == errno.EOWNERDEAD:
            self._dead_token = words[_TOKEN_WORD]
            self._recovered = True
            _consistent(self._address)
            words[_RECOVERIES_WORD] += 1  # we hold the mutex: nobody else writes it now
        else:
            self._recovered, self._dead_token = False, 0
        words[_TOKEN_WORD] = _process["token"]
        self._holder = (_process["pid"], threading.get_ident(), self._futex_tid())

    def _failed(self, rc: int) -> None:
        if rc == errno.EDEADLK:
            raise DeadlockError(
                f"{self._what} is already held by this thread: a Mutex is not re-entrant, so "
                "this acquire could never succeed", obj=self._what, backend="posix")
        if rc == errno.ENOTRECOVERABLE:
            raise ObjectCorruptError(
                f"{self._what} is not recoverable: a holder that found its previous owner "
                "dead released it without marking it consistent", obj=self._what,
                backend="posix")
        raise OSError(rc, f"{self._what}: acquire failed: {os.strerror(rc)}")

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As the compiled ``RobustMutex.acquire``."""
        self._block()
        if timeout is not None and not blocking:
            raise InvalidArgumentError("a timeout makes no sense with blocking=False",
                                       obj=self._what, backend="posix")
        seconds = check_timeout(timeout)
        rc = _trylock(self._address)
        if rc in (0, errno.EOWNERDEAD):
            self._took(rc)
            return True
        if rc == errno.EDEADLK and not blocking:
            return False
        if rc != errno.EBUSY:
            self._failed(rc)
        if not blocking or seconds == 0:
            return False
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            until = now + _SLICE if deadline is None else min(deadline, now + _SLICE)
            me = (_process["pid"], threading.get_ident())
            self._waiters.add(me)  # _unbind refuses meanwhile: the block must stay mapped
            try:
                rc = self._lock_until(until)
            finally:
                self._waiters.discard(me)
            if rc in (0, errno.EOWNERDEAD):
                self._took(rc)
                return True
            if rc != errno.ETIMEDOUT:
                self._failed(rc)
            self._block()  # a signal handler may have closed this handle meanwhile

    def _lock_until(self, until: float) -> int:
        if _clocklock is not None:
            stamp = _Timespec(int(until), int((until % 1) * 1e9))
            return int(_clocklock(self._address, _CLOCK_MONOTONIC, ctypes.byref(stamp)))
        wall = time.time() + (until - time.monotonic())  # an old glibc: realtime deadline
        stamp = _Timespec(int(wall), int((wall % 1) * 1e9))
        return int(_timedlock(self._address, ctypes.byref(stamp)))

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        """As the compiled ``RobustMutex.release``."""
        words = self._block()
        if not self._held_here():
            self._not_owner()
        mine, words[_TOKEN_WORD] = words[_TOKEN_WORD], 0
        self._holder = None
        self._recovered, self._dead_token = False, 0
        rc = _unlock(self._address)
        if rc == errno.EPERM:  # a stale record: put back the real holder's token
            if words[_TOKEN_WORD] == 0:
                words[_TOKEN_WORD] = mine
            self._not_owner()
        if rc:
            raise OSError(rc, f"{self._what}: release failed: {os.strerror(rc)}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _not_owner(self) -> None:
        token, tid = self._block()[_TOKEN_WORD], self._futex_tid()
        pid = token & 0xFFFFFFFF
        if tid and token and pid != _process["pid"]:
            raise NotOwnerError(
                f"{self._what} is held by pid {pid}, not by this thread (pid "
                f"{_process['pid']}); only the holder may release it", obj=self._what,
                backend="posix")
        holder = ("nobody" if not tid else "a thread not yet recorded" if not token
                  else "another thread of this process")
        raise NotOwnerError(
            f"{self._what} is held by {holder}, not by this thread (pid {_process['pid']}) "
            "through this handle; only the holder may release it", obj=self._what,
            backend="posix")

    # -- queries ----------------------------------------------------------------------------

    def locked(self) -> bool:
        """True if some thread holds the mutex (a snapshot)."""
        return self._futex_tid() != 0

    def _held_here(self) -> bool:
        return (self._words is not None and self._held_by_recorded_thread()
                and self._holder is not None and self._holder[1] == threading.get_ident())

    @property
    def owner(self) -> int | None:
        """The pid of the holder, or None when unlocked (a snapshot)."""
        if self._futex_tid() == 0:
            return None
        token = self._block()[_TOKEN_WORD]
        return (token & 0xFFFFFFFF) or None

    @property
    def previous_owner_died(self) -> bool:
        """True while this thread holds the mutex and its previous holder died holding it."""
        return self._held_here() and self._recovered

    @property
    def dead_owner_pid(self) -> int | None:
        """The pid of the holder that died, while previous_owner_died is True."""
        if not (self.previous_owner_died and self._dead_token):
            return None
        return self._dead_token & 0xFFFFFFFF

    @property
    def recoveries(self) -> int:
        """How many times a taker has found the previous holder dead."""
        return int(self._block()[_RECOVERIES_WORD])

    @property
    def _closed(self) -> bool:
        return self._words is None


class CounterCore:
    """The ctypes twin of ``_core.CounterCore``: no fast path of its own, every call goes to
    the counter's Python paths (which are complete)."""

    __slots__ = ()

    def _counter_bind(self, buffer: Any, pending: int, mode: int, frozen_sum: int) -> None:
        pass

    def _counter_unbind(self) -> None:
        pass

    def _cache_lane(self, word: int, pin: int, pinned: bool) -> None:
        pass

    def _uncache_lane(self) -> None:
        pass

    def add(self, n: int = 1) -> None:
        """Add ``n`` (default 1).  Never blocks, never loses an update.

        Raises InvalidArgumentError if ``n`` is not an int in the int64 range,
        ObjectClosedError once closed.
        """
        self._add_slow(n)  # type: ignore[attr-defined]

    def add_and_get(self, n: int = 1) -> int:
        """Add ``n`` and return the new total, as one linearizable step.

        Raises InvalidArgumentError if ``n`` is not an int in the int64 range,
        ObjectClosedError once closed.
        """
        return self._add_and_get_slow(n)  # type: ignore[attr-defined, no-any-return]
