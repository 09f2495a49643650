"""ipcfork: fork-based multi-tasking with System V and POSIX IPC done right.

Primitives (each over ``backend="posix"`` or ``backend="sysv"``, anonymous or named):
:class:`Semaphore`, :class:`Mutex` (robust, with ownership), :class:`Barrier`,
:class:`SharedMemory` and :class:`MessageQueue`; shared data: :class:`SharedCounter`,
:class:`SharedValue`/:class:`SharedArray`, :class:`RateLimiter`.  :class:`ForkPool` runs
callables in forked children (``ipcfork.pool``); :func:`collapse_hugepages` keeps forks from
a big parent cheap; :class:`Service` supervises long-running workers (``ipcfork.service``);
``backend="dask"`` (``pip install 'ipcfork[dask]'``) puts Mutex, Semaphore, SharedCounter and
MessageQueue on a dask cluster (``ipcfork.dask``).
Errors derive from :class:`IpcforkError`.
"""

from ._os.hugepages import HugepageReport, collapse_hugepages
from .barrier import Barrier
from .counter import SharedCounter
from .errors import (
    AccessDeniedError,
    BrokenBarrierError,
    BufferInUseError,
    ChildCrashedError,
    CrashLoopError,
    DeadlockError,
    ForkSafetyWarning,
    HugepageWarning,
    InvalidArgumentError,
    IpcforkError,
    LedgerBusyError,
    LedgerMismatchError,
    LimitExceededError,
    NotOwnerError,
    ObjectClosedError,
    ObjectCorruptError,
    ObjectExistsError,
    ObjectNotFoundError,
    QueueEmptyError,
    QueueFullError,
    RemoteTraceback,
    ServiceError,
    ServiceRunningError,
    TaskTimeoutError,
    UncertainTasksError,
    UnsafeObjectError,
    WaitTimeoutError,
)
from .ledger import Ledger, task_key
from .mqueue import MessageQueue
from .mutex import Mutex
from .pool import ForkPool, TaskFuture, TaskRecord
from .pool.transfer import result_buffer
from .ratelimit import RateLimiter
from .semaphore import Semaphore
from .service import Service, WorkerContext
from .shared import SharedArray, SharedValue
from .shm import SharedMemory

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "Barrier",
    "BrokenBarrierError",
    "BufferInUseError",
    "ChildCrashedError",
    "CrashLoopError",
    "DeadlockError",
    "ForkPool",
    "ForkSafetyWarning",
    "HugepageReport",
    "HugepageWarning",
    "InvalidArgumentError",
    "IpcforkError",
    "Ledger",
    "LedgerBusyError",
    "LedgerMismatchError",
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
    "Service",
    "ServiceError",
    "ServiceRunningError",
    "SharedArray",
    "SharedCounter",
    "SharedMemory",
    "SharedValue",
    "TaskFuture",
    "TaskRecord",
    "TaskTimeoutError",
    "UncertainTasksError",
    "UnsafeObjectError",
    "WaitTimeoutError",
    "WorkerContext",
    "collapse_hugepages",
    "result_buffer",
    "task_key",
]
