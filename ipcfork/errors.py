"""The exception hierarchy of ipcfork.

Every error derives from :class:`IpcforkError` *and* from the built-in exception a caller
would already catch (``TimeoutError``, ``FileExistsError``, ``PermissionError``, ...), so
``except TimeoutError`` keeps working.  Every error pickles (errors cross ``fork`` boundaries
inside ipcfork) and carries three optional facts that the message also states:

``obj``
    a description of the object concerned (``"Mutex '/jobs' (posix)"``),
``backend``
    ``"sysv"`` or ``"posix"`` where one applies,
``limit``
    the limit that was hit, as text (``"SEMVMX=32767"``, ``"size <= 8 GiB"``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

__all__ = [
    "AccessDeniedError",
    "BrokenBarrierError",
    "BufferInUseError",
    "DeadlockError",
    "ChildCrashedError",
    "CrashLoopError",
    "ForkSafetyWarning",
    "HugepageWarning",
    "IpcforkError",
    "InvalidArgumentError",
    "LedgerBusyError",
    "LedgerMismatchError",
    "LimitExceededError",
    "NotOwnerError",
    "ObjectClosedError",
    "ObjectCorruptError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "QueueEmptyError",
    "QueueFullError",
    "RemoteTraceback",
    "ServiceError",
    "ServiceRunningError",
    "TaskTimeoutError",
    "UncertainTasksError",
    "UnsafeObjectError",
    "WaitTimeoutError",
]


def _rebuild(cls: type[IpcforkError], message: str, facts: dict[str, Any]) -> IpcforkError:
    return cls(message, **facts)


class IpcforkError(Exception):
    """Base class of every error ipcfork raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        obj: str | None = None,
        backend: str | None = None,
        limit: str | None = None,
    ) -> None:
        # OSError subclasses interpret positional args as (errno, strerror): pass only the
        # message so str(err) is always exactly the message.
        if limit and limit not in message:
            message = f"{message} (limit: {limit})"
        Exception.__init__(self, message)
        self.message = message
        self.obj = obj
        self.backend = backend
        self.limit = limit

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        facts = {"obj": self.obj, "backend": self.backend, "limit": self.limit}
        return (_rebuild, (type(self), self.message, facts), self.__dict__)


class InvalidArgumentError(IpcforkError, ValueError):
    """An argument is out of range or of the wrong form; the message names the limit."""


class LimitExceededError(IpcforkError, OverflowError):
    """A request passes a kernel or library limit (value, size, count)."""


class WaitTimeoutError(IpcforkError, TimeoutError):
    """A blocking call ran out of time (only where a ``False`` return is not the API)."""


class ObjectExistsError(IpcforkError, FileExistsError):
    """Exclusive creation found an object already there."""


class ObjectNotFoundError(IpcforkError, FileNotFoundError):
    """The named object does not exist (or was removed while in use)."""


class UnsafeObjectError(IpcforkError, PermissionError):
    """The object is owned by another user or writable by group/others.

    Opening such an object could let another user tamper with it (a "squatted" name).
    Pass ``allow_foreign=True`` to open it anyway.  Also raised when the kernel itself
    refuses access.
    """


class AccessDeniedError(IpcforkError, PermissionError):
    """The kernel refused access to the object (its mode or owner does not admit us)."""


class ObjectCorruptError(IpcforkError, OSError):
    """The object exists but is malformed (for example a truncated semaphore file)."""


class ObjectClosedError(IpcforkError, ValueError):
    """The handle was closed (or the object unlinked) by this process."""


class NotOwnerError(IpcforkError, RuntimeError):
    """A mutex was released by a process that does not hold it."""


class DeadlockError(IpcforkError, RuntimeError):
    """A thread asked for a lock it already holds: the wait could never end."""


class BufferInUseError(IpcforkError, BufferError):
    """Shared memory cannot be closed while views (memoryview, numpy) still point into it."""


class QueueEmptyError(IpcforkError, queue.Empty, TimeoutError):
    """``get`` found no message in time (also a :class:`queue.Empty`)."""


class QueueFullError(IpcforkError, queue.Full, TimeoutError):
    """``put`` found no room in time (also a :class:`queue.Full`)."""


class BrokenBarrierError(IpcforkError, threading.BrokenBarrierError):
    """A party timed out or aborted, so the barrier cannot complete this round."""


class ChildCrashedError(IpcforkError, ChildProcessError):
    """A task's child process died without handing back an outcome.

    ``pid``, ``exitcode`` (None if a signal ended it) and ``signal`` (None if it exited)
    say how; the message says whether it died mid-transfer.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
        **facts: Any,
    ) -> None:
        super().__init__(message, **facts)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal


class TaskTimeoutError(IpcforkError, TimeoutError):
    """A task ran past the pool's ``timeout`` and its child was terminated."""


class ServiceError(IpcforkError, RuntimeError):
    """A supervised :class:`~ipcfork.Service` could not start or had to stop."""


class ServiceRunningError(ServiceError):
    """The pidfile is locked by a live service; ``pid`` is that service's pid."""

    def __init__(self, message: str, *, pid: int | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.pid = pid


class CrashLoopError(ServiceError):
    """Workers died more than ``max_restarts`` times within ``restart_window`` seconds, so
    the service stopped instead of restarting them for ever."""


class LedgerMismatchError(IpcforkError, ValueError):
    """A resumed batch does not match its ledger: an item whose fingerprint differs from
    the one recorded under its key, another function, or another kind of key.  The message
    names the ledger's path and the key (or what differs)."""


class LedgerBusyError(IpcforkError, RuntimeError):
    """Another live process runs a batch on this ledger (or reconciles it); ``pid`` (None
    if it could not be learned) and the message name it."""

    def __init__(self, message: str, *, pid: int | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.pid = pid


class UncertainTasksError(IpcforkError, RuntimeError):
    """A batch run with ``uncertain="hold"`` found tasks that were started by an earlier run
    that died before recording their outcome; they were not run again.

    ``keys`` lists them and ``path`` names the ledger: reconcile each with
    ``ipcfork.Ledger(path).settle(key, ...)`` (it happened) or ``.forget(key)`` (run it
    again), then run the batch again.
    """

    def __init__(self, message: str, *, keys: list[str | int] | None = None,
                 path: str | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.keys = list(keys or [])
        self.path = path


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a child, as text; set as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class ForkSafetyWarning(RuntimeWarning):
    """Forking now may deadlock a child: other threads run in this process."""


class HugepageWarning(RuntimeWarning):
    """Huge pages could not be used as asked: transparent huge pages are off (``never``, or
    disabled for this process), ``MADV_COLLAPSE`` is not supported (only ``MADV_HUGEPAGE``
    was applied), or the kernel refused every collapse.  The message says what was done
    instead; forks keep working, only not faster."""
