"""libc calls that sysv_ipc and posix_ipc do not expose, through ctypes.

Used on slow paths only (a ctypes call costs about a microsecond here):

* ``prctl``: the parent-death signal of forked children, the child subreaper of a service.
* ``semtimedop``: the sysv_ipc wheel is built without it, so its timed acquire blocks forever.
* ``semget`` with three members (sysv_ipc makes one-member sets; PHP's ``sem_get`` needs
  three) and ``semctl`` queries of members other than the first.
* ``sem_timedwait`` on our own mapping of a POSIX semaphore, and ``mq_timedsend`` /
  ``mq_timedreceive`` on a queue descriptor: posix_ipc runs Python signal handlers inside
  its blocking calls and then replaces whatever the handler raised (KeyboardInterrupt
  included) with its own SignalError, so Ctrl-C would be lost.  Through ctypes, EINTR comes
  back to Python, the handler runs at the next bytecode and its exception propagates.

Every wait here returns ``None`` on EINTR, so the caller recomputes its remaining time and
retries; a handler that raised has already ended the caller by then.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Any

__all__ = [
    "WAIT_DONE",
    "WAIT_INTERRUPTED",
    "WAIT_TIMEOUT",
    "mq_timedreceive",
    "mq_timedsend",
    "prctl",
    "sem_close",
    "sem_getval",
    "sem_member_exists",
    "sem_member_info",
    "sem_open",
    "sem_timedwait",
    "semget",
    "semtimedop",
]

WAIT_DONE, WAIT_TIMEOUT, WAIT_INTERRUPTED = 0, 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
try:
    _librt = ctypes.CDLL("librt.so.1", use_errno=True)
except OSError:  # glibc >= 2.34 has the mq_* calls in libc itself
    _librt = _libc


class _Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short),
                ("sem_flg", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _bind(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> Any:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


_TS = ctypes.POINTER(_Timespec)
_semtimedop = _bind(_libc, "semtimedop", ctypes.c_int, ctypes.c_int,
                    ctypes.POINTER(_Sembuf), ctypes.c_size_t, _TS)
_semctl = _bind(_libc, "semctl", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_semget = _bind(_libc, "semget", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_sem_open = _bind(_libc, "sem_open", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int)
_sem_close = _bind(_libc, "sem_close", ctypes.c_int, ctypes.c_void_p)
_sem_wait = _bind(_libc, "sem_wait", ctypes.c_int, ctypes.c_void_p)
_sem_timedwait = _bind(_libc, "sem_timedwait", ctypes.c_int, ctypes.c_void_p, _TS)
_mq_timedsend = _bind(_librt, "mq_timedsend", ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                      ctypes.c_size_t, ctypes.c_uint, _TS)
_mq_timedreceive = _bind(_librt, "mq_timedreceive", ctypes.c_ssize_t, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint), _TS)
_SEM_FAILED = ctypes.c_void_p(-1).value
GETPID, GETVAL, GETNCNT, GETZCNT = 11, 12, 14, 15


def _relative(timeout: float) -> ctypes._Pointer[_Timespec]:
    whole = int(timeout)
    return ctypes.pointer(_Timespec(whole, int((timeout - whole) * 1e9)))


def _absolute_realtime(timeout: float | None) -> ctypes._Pointer[_Timespec] | None:
    # sem_timedwait and mq_timed* take CLOCK_REALTIME deadlines; callers re-derive the
    # remaining time from the monotonic clock before every call, so a clock step can only
    # shorten or lengthen one call, never the whole wait.
    if timeout is None:
        return None
    end = time.time() + timeout
    whole = int(end)
    return ctypes.pointer(_Timespec(whole, int((end - whole) * 1e9)))


def _outcome(rc: int, *timeouts: int) -> int:
    if rc != -1:
        return WAIT_DONE
    err = ctypes.get_errno()
    if err == errno.EINTR:
        return WAIT_INTERRUPTED
    if err in timeouts:
        return WAIT_TIMEOUT
    raise OSError(err, os.strerror(err))


def semtimedop(semid: int, ops: list[tuple[int, int, int]], timeout: float | None) -> int:
    """One ``semtimedop`` call: WAIT_DONE, WAIT_TIMEOUT (also EAGAIN for IPC_NOWAIT) or
    WAIT_INTERRUPTED.  Raises OSError for other failures (EIDRM: removed)."""
    array = (_Sembuf * len(ops))(*[_Sembuf(n, op, flg) for n, op, flg in ops])
    spec = None if timeout is None else _relative(timeout)
    return _outcome(_semtimedop(semid, array, len(ops), spec), errno.EAGAIN)


def semget(key: int, nsems: int, flags: int) -> int:
    """``semget(key, nsems, flags)``: the set's id.  Raises OSError (EEXIST, ENOSPC, ...)."""
    semid = int(_semget(ctypes.c_int(key & 0xFFFFFFFF).value, nsems, flags))
    if semid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return semid


def sem_getval(semid: int, member: int) -> int:
    """The value of member ``member`` of SysV set ``semid``.  Raises OSError."""
    value = int(_semctl(semid, member, GETVAL))
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value


def sem_member_exists(semid: int, member: int) -> bool:
    """True if SysV semaphore set ``semid`` has member number ``member``."""
    return bool(_semctl(semid, member, GETVAL) >= 0)


def sem_member_info(semid: int, member: int) -> tuple[int, int, int] | None:
    """``(last operating pid, processes waiting for an increase, waiting for zero)`` of
    member ``member`` of SysV set ``semid``; None if the set or member does not exist."""
    values = [_semctl(semid, member, command) for command in (GETPID, GETNCNT, GETZCNT)]
    if min(values) < 0:
        return None
    return values[0], values[1], values[2]


def sem_open(name: str) -> int:
    """Map an existing POSIX semaphore; returns the ``sem_t *``.  Raises OSError."""
    handle = _sem_open(name.encode(), 0)
    if handle is None or handle == _SEM_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return int(handle)


def sem_close(handle: int) -> None:
    _sem_close(handle)


def sem_timedwait(handle: int, timeout: float | None) -> int:
    """One wait on a ``sem_t *``: WAIT_DONE, WAIT_TIMEOUT or WAIT_INTERRUPTED."""
    if timeout is None:
        return _outcome(_sem_wait(handle))
    return _outcome(_sem_timedwait(handle, _absolute_realtime(timeout)), errno.ETIMEDOUT)


def mq_timedsend(mqd: int, data: bytes, timeout: float | None, priority: int = 0) -> int:
    """One send on a POSIX queue descriptor: WAIT_DONE, WAIT_TIMEOUT or WAIT_INTERRUPTED."""
    rc = _mq_timedsend(mqd, data, len(data), priority, _absolute_realtime(timeout))
    return _outcome(rc, errno.ETIMEDOUT, errno.EAGAIN)


def mq_timedreceive(mqd: int, buffer: ctypes.Array[ctypes.c_char],
                    timeout: float | None) -> tuple[int, int]:
    """One receive into ``buffer``: ``(outcome, message length)``."""
    size = _mq_timedreceive(mqd, buffer, len(buffer), None, _absolute_realtime(timeout))
    if size >= 0:
        return WAIT_DONE, int(size)
    return _outcome(-1, errno.ETIMEDOUT, errno.EAGAIN), 0


_prctl = _bind(_libc, "prctl", ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
               ctypes.c_ulong, ctypes.c_ulong)


def prctl(option: int, arg: int = 0) -> int:
    """``prctl(option, arg, 0, 0, 0)``; returns its result (an address as ``arg`` for the
    options that write one).  Raises OSError when the kernel refuses."""
    rc = int(_prctl(option, arg, 0, 0, 0))
    if rc == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")
    return rc
