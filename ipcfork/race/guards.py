"""Guards: what a scenario's workers use to protect their read-modify-write.

Three kinds of guard:

``none``
    nothing: the race in the raw.
``lock``
    a lock taken around each critical section.  :func:`make_lock` builds one
    :class:`LockHandle` of the guard's kind; scenarios that need several (the ring buffer's
    head and tail, the deadlock's ring) ask for several.
``atomic``
    ``ipcfork.SharedCounter``: every update is one atomic add, so there is no critical
    section at all; only scenarios made of additions (``counter``, ``transfer``) can use it.

``flock-inherited`` is broken on purpose and never run unless named: a descriptor opened
before ``fork`` is one open file description shared by the whole family, and ``flock`` locks
belong to the description, so every worker "holds" the lock at once.

``mutex-dask`` and ``counter-dask`` run only with ``ipcfork race --cluster`` (``cluster.py``),
where the counter lives in a dask scheduler instead of shared memory.

``semaphore-sysv`` and ``posix-sem`` (``posix_ipc`` used directly, no ipcfork) are *extra*:
they race like ``semaphore`` and are not in the default sweep of the race scenarios, but the
``crash`` scenario runs them by default (a holder's death leaves both taken).  A *robust*
guard is one ipcfork promises survives a holder killed by SIGKILL: wedging is its failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import posix_ipc

from .._os.names import anonymous_posix_name
from ..errors import InvalidArgumentError
from ..mutex import Mutex
from ..semaphore import Semaphore

__all__ = [
    "ALL_GUARDS",
    "DEFAULT_GUARDS",
    "GUARDS",
    "AtomicCounter",
    "GuardSpec",
    "LockHandle",
    "guard_spec",
    "make_counter",
    "make_lock",
    "unavailable",
]

_FLOCK_POLL = (0.0005, 0.01)  # flock has no timeout: poll from 0.5 ms backing off to 10 ms


@dataclass(frozen=True)
class GuardSpec:
    """A guard's name, its kind (``none``, ``lock`` or ``atomic``) and what it is."""

    name: str
    kind: str
    description: str
    broken: bool = False  # shown for contrast: it claims to guard but excludes nobody
    extra: bool = False  # run only when named (or by the crash scenario's defaults)
    robust: bool = False  # ipcfork promises it survives a holder's SIGKILL
    cluster: bool = False  # runs only across a dask cluster (``--cluster``, ``cluster.py``)

    @property
    def guarded(self) -> bool:
        """True if this guard claims to prevent lost updates (so losing one is a failure)."""
        return self.kind != "none"


GUARDS: dict[str, GuardSpec] = {spec.name: spec for spec in (
    GuardSpec("none", "none", "no guard: read, (window), write"),
    GuardSpec("mutex-posix", "lock", "ipcfork.Mutex(backend='posix')", robust=True),
    GuardSpec("mutex-sysv", "lock", "ipcfork.Mutex(backend='sysv')", robust=True),
    GuardSpec("semaphore", "lock", "ipcfork.Semaphore(1) used as a lock"),
    GuardSpec("semaphore-sysv", "lock", "ipcfork.Semaphore(1, backend='sysv') used as a lock",
              extra=True),
    GuardSpec("counter", "atomic", "ipcfork.SharedCounter.add: one atomic add per update",
              robust=True),
    GuardSpec("posix-sem", "lock", "posix_ipc.Semaphore(1) used directly as a lock",
              extra=True),
    GuardSpec("mp-lock", "lock", "multiprocessing.Lock (fork context)"),
    GuardSpec("flock", "lock", "fcntl.flock on a descriptor each worker opens after fork"),
    GuardSpec("flock-inherited", "lock",
              "fcntl.flock on ONE descriptor opened before fork (broken on purpose)",
              broken=True),
    GuardSpec("mutex-dask", "lock", "ipcfork.Mutex(backend='dask') (with --cluster only)",
              extra=True, cluster=True),
    GuardSpec("counter-dask", "atomic",
              "ipcfork.SharedCounter(backend='dask'): one actor call per update "
              "(with --cluster only)", extra=True, cluster=True),
)}
DEFAULT_GUARDS = tuple(name for name, spec in GUARDS.items()
                       if not spec.broken and not spec.extra)
ALL_GUARDS = tuple(GUARDS)


def guard_spec(name: str) -> GuardSpec:
    """The guard called ``name``.  Raises InvalidArgumentError naming the known guards."""
    try:
        return GUARDS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown guard {name!r}; choose from {', '.join(ALL_GUARDS)}",
            limit=f"one of {', '.join(ALL_GUARDS)}") from None


class LockHandle:
    """One lock of a guard's kind, used the same way whatever it is.

    ``raw`` is the underlying object, used directly with ``with`` in the hot loops so that
    no wrapper call distorts the throughput being compared; :meth:`acquire` (with a timeout)
    and :meth:`release` serve the deadlock scenario; :meth:`attach` runs in each worker
    right after the fork.
    """

    def __init__(self, raw: Any, acquire: Callable[[float], bool],
                 release: Callable[[], None], attach: Callable[[], None] | None = None) -> None:
        self.raw = raw
        self._acquire = acquire
        self.release = release
        self._attach = attach

    def attach(self) -> None:
        """Per-process set-up, called once in each worker after the fork."""
        if self._attach is not None:
            self._attach()

    def acquire(self, timeout: float) -> bool:
        """Take the lock; False if ``timeout`` seconds passed first."""
        return self._acquire(timeout)


class _Flock:
    """An exclusive ``flock`` on a temporary file, usable with ``with``.

    ``per_process=True`` (the right way): each worker opens its own descriptor in
    :meth:`attach`, after the fork, so each holds its own open file description and the
    workers exclude each other.  ``per_process=False``: the descriptor opened here, before
    the fork, is inherited, and the lock excludes nobody in the family.
    """

    def __init__(self, per_process: bool) -> None:
        self.fd, self.path = tempfile.mkstemp(prefix="ipcfork-race-", suffix=".lock")
        self._per_process = per_process
        if per_process:
            os.close(self.fd)
            self.fd = -1

    def attach(self) -> None:
        if self._per_process:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def acquire(self, timeout: float) -> bool:
        # flock has no timed form: poll the non-blocking one, backing off.
        deadline = time.monotonic() + timeout
        pause = _FLOCK_POLL[0]
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, _FLOCK_POLL[1])

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def make_lock(name: str, stack: contextlib.ExitStack) -> LockHandle:
    """A new lock of guard ``name``'s kind, closed when ``stack`` closes.

    Raises InvalidArgumentError for a guard that is not a lock (``none``, ``counter``).
    """
    if name in ("mutex-posix", "mutex-sysv"):
        mutex = Mutex(backend=name.removeprefix("mutex-"))
        stack.callback(mutex.close)
        return LockHandle(mutex, lambda t: mutex.acquire(timeout=t), mutex.release)
    if name in ("semaphore", "semaphore-sysv"):
        sem = Semaphore(1, backend="sysv" if name == "semaphore-sysv" else "posix")
        stack.callback(sem.close)
        return LockHandle(sem, lambda t: sem.acquire(timeout=t), sem.release)
    if name == "posix-sem":
        return _plain_posix_semaphore(stack)
    if name == "mp-lock":
        # The fork context's semaphore is unlinked at birth: nothing can be left behind.
        lock = multiprocessing.get_context("fork").Lock()
        return LockHandle(lock, lambda t: lock.acquire(timeout=t), lock.release)
    if name in ("flock", "flock-inherited"):
        flock = _Flock(per_process=name == "flock")
        stack.callback(flock.close)
        return LockHandle(flock, flock.acquire, flock.release, flock.attach)
    raise InvalidArgumentError(f"guard {name!r} is not a lock",
                               limit="a lock guard: " + ", ".join(
                                   n for n, s in GUARDS.items() if s.kind == "lock"))


def _plain_posix_semaphore(stack: contextlib.ExitStack) -> LockHandle:
    """A ``posix_ipc.Semaphore`` with value 1, unlinked at birth (forked workers share the
    mapping; nothing is left behind whatever happens), used with no ipcfork code around it."""
    sem = posix_ipc.Semaphore(anonymous_posix_name("sem"), posix_ipc.O_CREX, 0o600, 1)
    stack.callback(sem.close)
    sem.unlink()

    def acquire(timeout: float) -> bool:
        try:
            sem.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        return True

    return LockHandle(sem, acquire, sem.release)


class AtomicCounter(Protocol):
    """The part of ``ipcfork.SharedCounter`` the atomic guard uses."""

    @property
    def value(self) -> int: ...

    def add(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


def _shared_counter_class() -> Any:
    # Looked up at run time: SharedCounter may not exist in this version of ipcfork.
    return getattr(importlib.import_module("ipcfork"), "SharedCounter", None)


def unavailable(name: str) -> str | None:
    """Why guard ``name`` cannot run here, or None if it can."""
    if guard_spec(name).cluster:
        return "runs across a dask cluster only: use --cluster"
    if guard_spec(name).kind == "atomic":
        if _shared_counter_class() is None:
            return "ipcfork.SharedCounter is not available in this version of ipcfork"
        from .._os.native import PATH
        from ..errors import IpcforkError

        if PATH == "ctypes":  # the fallback's atomics need libatomic
            from .._os.native.libatomic import load_libatomic

            try:
                load_libatomic()
            except IpcforkError as exc:  # no libatomic, or no lock-free 8-byte atomics
                return str(exc)
    return None


def make_counter(stack: contextlib.ExitStack, initial: int = 0) -> AtomicCounter:
    """A new anonymous ``ipcfork.SharedCounter``, closed when ``stack`` closes.

    Raises ImportError when this version of ipcfork has no SharedCounter.
    """
    cls = _shared_counter_class()
    if cls is None:
        raise ImportError(unavailable("counter"))
    counter: AtomicCounter = cls(initial)
    stack.callback(counter.close)
    return counter
