"""ipcfork: fork-based multi-tasking with System V and POSIX IPC done right.

Primitives (each over ``backend="posix"`` or ``backend="sysv"``, anonymous or named):
:class:`Semaphore`, :class:`Mutex` (robust, with ownership), :class:`Barrier`,
:class:`SharedMemory` and :class:`MessageQueue`.  Errors derive from :class:`IpcforkError`.
"""

from .barrier import Barrier
from .counter import SharedCounter
from .errors import (
    AccessDeniedError,
    BrokenBarrierError,
    BufferInUseError,
    ChildCrashedError,
    DeadlockError,
    ForkSafetyWarning,
    InvalidArgumentError,
    IpcforkError,
    LimitExceededError,
    NotOwnerError,
    ObjectClosedError,
    ObjectCorruptError,
    ObjectExistsError,
    ObjectNotFoundError,
    QueueEmptyError,
    QueueFullError,
    RemoteTraceback,
    TaskTimeoutError,
    UnsafeObjectError,
    WaitTimeoutError,
)
from .mqueue import MessageQueue
from .mutex import Mutex
from .pool import ForkPool, TaskFuture, TaskRecord
from .ratelimit import RateLimiter
from .semaphore import Semaphore
from .shared import SharedArray, SharedValue
from .shm import SharedMemory

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "Barrier",
    "BrokenBarrierError",
    "BufferInUseError",
    "ChildCrashedError",
    "DeadlockError",
    "ForkPool",
    "ForkSafetyWarning",
    "InvalidArgumentError",
    "IpcforkError",
    "LimitExceededError",
    "MessageQueue",
    "Mutex",
    "NotOwnerError",
    "ObjectClosedError",
    "ObjectCorruptError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "QueueEmptyError",
    "QueueFullError",
    "RateLimiter",
    "RemoteTraceback",
    "Semaphore",
    "SharedArray",
    "SharedCounter",
    "SharedMemory",
    "SharedValue",
    "TaskFuture",
    "TaskRecord",
    "TaskTimeoutError",
    "UnsafeObjectError",
    "WaitTimeoutError",
]
