"""The one place where sysv_ipc, posix_ipc and OSError failures become ipcfork errors.

Wrap each raw call in ``with translating(describe, backend, "acquire"):``; the original
exception is chained as ``__cause__`` and the new message says which operation failed on
which object.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import posix_ipc
import sysv_ipc

from ..errors import (
    AccessDeniedError,
    InvalidArgumentError,
    IpcforkError,
    LimitExceededError,
    ObjectExistsError,
    ObjectNotFoundError,
    WaitTimeoutError,
)

__all__ = ["fork_error", "translate_exception", "translating"]

_ERRNO_CLASSES: dict[int, type[IpcforkError]] = {
    errno.ENOENT: ObjectNotFoundError,
    errno.EIDRM: ObjectNotFoundError,
    errno.EEXIST: ObjectExistsError,
    errno.EACCES: AccessDeniedError,
    errno.EPERM: AccessDeniedError,
    errno.EINVAL: InvalidArgumentError,
    errno.ERANGE: LimitExceededError,
    errno.E2BIG: LimitExceededError,
    errno.ENOSPC: LimitExceededError,
    errno.ENOMEM: LimitExceededError,
    errno.EMFILE: LimitExceededError,
    errno.ENFILE: LimitExceededError,
    errno.EAGAIN: WaitTimeoutError,
}


def translate_exception(exc: BaseException, what: str, backend: str, op: str) -> IpcforkError:
    """Return the ipcfork error for ``exc`` raised by ``op`` on ``what``."""
    detail = str(exc) or type(exc).__name__
    message = f"{op} on {what} failed: {detail}"
    cls: type[IpcforkError] = IpcforkError
    if isinstance(exc, IpcforkError):
        return exc
    if isinstance(exc, (sysv_ipc.ExistentialError, posix_ipc.ExistentialError)):
        cls = ObjectExistsError if "exists" in detail and "No " not in detail else (
            ObjectNotFoundError
        )
    elif isinstance(exc, (sysv_ipc.PermissionsError, posix_ipc.PermissionsError)):
        cls = AccessDeniedError
    elif isinstance(exc, (sysv_ipc.BusyError, posix_ipc.BusyError)):
        cls = WaitTimeoutError
    elif isinstance(exc, OSError) and exc.errno in _ERRNO_CLASSES:
        cls = _ERRNO_CLASSES[exc.errno]
    elif isinstance(exc, (ValueError, TypeError)):
        cls = InvalidArgumentError
    elif isinstance(exc, (OverflowError, MemoryError)):
        return LimitExceededError(message, obj=what, backend=backend,
                                  limit="available memory and kernel IPC limits")
    return cls(message, obj=what, backend=backend)


@contextmanager
def translating(what: str, backend: str, op: str) -> Iterator[None]:
    """Re-raise raw IPC failures inside the block as ipcfork errors, chaining the original."""
    try:
        yield
    except IpcforkError:
        raise
    except (sysv_ipc.Error, posix_ipc.Error, OSError, ValueError, OverflowError,
            MemoryError) as exc:
        raise translate_exception(exc, what, backend, op) from exc


def fork_error(exc: OSError) -> IpcforkError:
    """The error a task gets when ``fork`` itself failed: out of processes (EAGAIN: the
    pids cgroup, RLIMIT_NPROC or threads-max) or out of memory, as LimitExceededError."""
    if exc.errno in (errno.EAGAIN, errno.ENOMEM):
        what = "processes" if exc.errno == errno.EAGAIN else "memory"
        return LimitExceededError(
            f"fork failed: out of {what} ({exc.strerror}) and no child of this pool was "
            "running to wait for", obj="ForkPool",
            limit="RLIMIT_NPROC, pids.max, kernel.threads-max" if what == "processes"
            else "available memory")
    return translate_exception(exc, "ForkPool", "-", "fork")

