"""``Mutex(name, backend="dask")`` and ``Semaphore(n, name, backend="dask")``: dask's
lease-based ``Lock`` and ``Semaphore`` held in the scheduler, behind ipcfork's interface.

A lease is held while the handle that took it keeps refreshing it (every fifth of
``distributed.scheduler.locks.lease-timeout``, from its process's event loop); the
scheduler gives back a lease that has gone unrefreshed for longer than that timeout,
checking every ``lease-validation-interval``.  So a holder that dies (SIGKILL, a lost
worker) loses its hold within about ``lease-timeout + lease-validation-interval``; and a
holder that lives but cannot refresh (its event loop starved, a network partition) loses
it too, silently, and two holders may then overlap.  Nobody is told that a lease expired:
``previous_owner_died`` is always False and ``dead_owner_pid`` None.
"""

from __future__ import annotations

import os
import re
import threading
from types import TracebackType
from typing import Any

from .._common import check_count
from .._os.timeouts import check_timeout
from ..errors import (
    BufferInUseError,
    DeadlockError,
    InvalidArgumentError,
    NotOwnerError,
)
from ..mutex import Mutex
from ..semaphore import Semaphore
from .client import (
    check_local_options,
    check_name,
    check_usable,
    cluster_key,
    require_distributed,
    resolve_client,
    scheduler_and_loop,
)
from .leases import take_lease

__all__ = ["DaskMutex", "DaskSemaphore"]

MAX_LEASES = 2**31 - 1
_INCONSISTENT = re.compile(r"Inconsistent max leases: \d+, expected: (\d+)")


class _Handle:
    """What both classes share: the client, the process that opened the handle (a dask
    handle does not cross ``fork``: the child has no event loop), closing."""

    _kind = "object"

    def _open(self, name: object, client: Any, options: dict[str, Any]) -> Any:
        check_local_options(self._kind, options)
        self._plain_name = check_name(self._kind, name)
        self.name: str | None = self._plain_name
        self.backend = "dask"
        self.created = False  # not knowable: the scheduler makes it on first use
        self._what = f"{self._kind} {self.name!r} (dask)"
        self._client = resolve_client(client)
        self._pid = os.getpid()
        self._closed = False
        return require_distributed()

    def _check(self) -> None:
        check_usable(self._what, self._closed, self._pid)

    @staticmethod
    def _dask_timeout(blocking: bool, timeout: float | None) -> float | None:
        if timeout is not None:
            timeout = check_timeout(timeout)
            if not blocking:
                raise InvalidArgumentError("a timeout makes no sense with blocking=False")
        return 0.0 if not blocking else timeout

    @staticmethod
    def _stop_refreshing(dask_object: Any) -> None:
        callback = getattr(dask_object, "refresh_callback", None)
        if callback is not None:
            callback.stop()


def _reopen_mutex(name: str) -> DaskMutex:
    return DaskMutex(name)


def _reopen_semaphore(value: int, name: str) -> DaskSemaphore:
    return DaskSemaphore(value, name)


class DaskMutex(_Handle, Mutex):
    """A cluster-wide mutex (``Mutex(name, backend="dask", client=None)``): a dask
    ``Lock`` named ``ipcfork-mutex-<name>`` in the scheduler.

    The holder is a thread of the process that took it, through this handle: another
    thread, or another handle, cannot release it (NotOwnerError), and the holding thread
    cannot take it again (DeadlockError; ``blocking=False`` gives False).  Pickling a
    handle (to send it into a task) sends only its name: the task gets a handle of its
    own, holding nothing.  A holder that dies loses the mutex when its lease expires
    (``distributed.scheduler.locks.lease-timeout``, 30 s by default), not at once as with
    the local backends, and the next holder is not told (``previous_owner_died`` is
    False).  ``owner`` is not knowable (the scheduler records lease ids, not holders).
    """

    _kind = "Mutex"

    def __init__(self, name: str | None = None, *, backend: str = "dask", client: Any = None,
                 **options: Any) -> None:
        distributed = self._open(name, client, options)
        scheduler, loop = scheduler_and_loop(self._client)
        self._lock = distributed.Lock(cluster_key("mutex", self._plain_name),
                                      scheduler_rpc=scheduler, loop=loop)
        self._holder: tuple[int, int] | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _reopen_mutex, (self.name,)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "held here" if self._holder else "not held here"
        return f"<Mutex {self._what} {state}>"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the mutex; True if taken, False if ``timeout`` seconds (measured in the
        scheduler) passed first or, with ``blocking=False``, if it is held.

        Raises InvalidArgumentError for a bad timeout or one given with ``blocking=False``;
        DeadlockError when the calling thread holds it already; ObjectClosedError once
        closed or in a forked child of the process that opened it.
        """
        wait = self._dask_timeout(blocking, timeout)
        self._check()
        me = (os.getpid(), threading.get_ident())
        if self._holder == me:
            if not blocking:
                return False
            raise DeadlockError(f"{self._what} is held by this thread already",
                                obj=self._what, backend="dask")
        taken = take_lease(self._lock, wait)
        if taken:
            self._holder = me
        return taken

    def release(self) -> None:
        """Give the mutex back.  Raises NotOwnerError unless this thread took it through
        this handle.  A lease that expired meanwhile (the holder could not refresh it for
        ``lease-timeout``) is gone already: the scheduler logs it, the release says
        nothing."""
        self._check()
        if self._holder != (os.getpid(), threading.get_ident()):
            raise NotOwnerError(f"{self._what} is not held by this thread through this "
                                f"handle", obj=self._what, backend="dask")
        self._holder = None  # first: a waiter here may take it as soon as it is released
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def owner(self) -> int | None:
        """Not knowable on a cluster: raises NotImplementedError (use :meth:`locked`)."""
        raise NotImplementedError("a dask Mutex does not record its holder; use locked()")

    @property
    def previous_owner_died(self) -> bool:
        """Always False: the scheduler expires a dead holder's lease without telling the
        next holder, so a death cannot be reported (see the module docstring)."""
        return False

    @property
    def dead_owner_pid(self) -> int | None:
        """Always None (see :attr:`previous_owner_died`)."""
        return None

    @property
    def held(self) -> bool:
        """True if a thread of this process holds the mutex through this handle."""
        return self._holder is not None

    def locked(self) -> bool:
        """True if someone on the cluster holds the mutex (one scheduler round trip; a
        snapshot)."""
        self._check()
        return bool(self._lock.locked())

    def close(self) -> None:
        """Stop using this handle.  Raises BufferInUseError while a thread holds the mutex
        through it (as the posix backend does); closing twice is harmless."""
        if self._closed:
            return
        if self._holder is not None and self._holder[0] == os.getpid():
            raise BufferInUseError(f"{self._what} is held through this handle: release it "
                                   f"before close()", obj=self._what)
        self._closed = True
        self._stop_refreshing(self._lock)

    def unlink(self) -> None:
        """Forget the mutex in the scheduler.  A holder elsewhere keeps its lease (its next
        refresh makes it again: dask logs that) until it releases, so handles opened
        meanwhile still wait for it; a mutex nobody holds is simply gone."""
        self._check()
        self._lock.close()


class DaskSemaphore(_Handle, Semaphore):
    """A cluster-wide counting semaphore (``Semaphore(value, name, backend="dask",
    client=None)``): a dask ``Semaphore`` of ``value`` leases named
    ``ipcfork-semaphore-<name>``.

    Unlike the local semaphores, a unit taken is a *lease* of the handle that took it: only
    that handle gives it back (:meth:`release` beyond this handle's leases raises
    NotOwnerError), so a dask semaphore limits concurrency but cannot carry signals from a
    producer to a consumer (use a dask MessageQueue).  A dead holder's leases come back when
    they expire (``distributed.scheduler.locks.lease-timeout``).  ``value`` is used only by
    the handle that creates the semaphore; later handles take the existing size.
    """

    _kind = "Semaphore"

    def __init__(self, value: int = 1, name: str | None = None, *, backend: str = "dask",
                 client: Any = None, **options: Any) -> None:
        check_count(value, "Semaphore value", low=1, high=MAX_LEASES)
        distributed = self._open(name, client, options)
        scheduler, loop = scheduler_and_loop(self._client)
        key = cluster_key("semaphore", self._plain_name)
        # The size is recorded in the scheduler's metadata so that later handles take it
        # (dask refuses a semaphore registered with another size).
        size = self._client.get_metadata(key, None)
        self._sem = distributed.Semaphore(size or value, key, scheduler_rpc=scheduler,
                                          loop=loop)
        try:
            self._sem.register()
        except ValueError as exc:  # made with another size meanwhile: take that one
            found = _INCONSISTENT.search(str(exc))
            if found is None:
                raise
            self._stop_refreshing(self._sem)
            self._sem = distributed.Semaphore(int(found.group(1)), key,
                                              scheduler_rpc=scheduler, loop=loop)
            self._sem.register()
        if size is None:
            self._client.set_metadata(key, int(self._sem.max_leases))
        self.max_value = int(self._sem.max_leases)
        self._held = 0
        self._count_lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _reopen_semaphore, (self.max_value, self.name)

    def __repr__(self) -> str:
        return f"<Semaphore {self._what} of {self.max_value}, {self._held} held here>"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one lease; True if taken, False if ``timeout`` seconds passed first (at once
        with ``blocking=False``).  Raises InvalidArgumentError as the local backends do."""
        wait = self._dask_timeout(blocking, timeout)
        self._check()
        taken = take_lease(self._sem, wait)
        if taken:
            with self._count_lock:
                self._held += 1
        return taken

    def release(self, n: int = 1) -> None:
        """Give back ``n`` of this handle's leases.  Raises InvalidArgumentError if ``n`` <
        1 and NotOwnerError if this handle holds fewer than ``n``."""
        check_count(n, "release count", low=1, high=MAX_LEASES)
        self._check()
        with self._count_lock:
            if n > self._held:
                raise NotOwnerError(
                    f"{self._what}: this handle holds {self._held} lease(s), cannot release "
                    f"{n} (a dask semaphore's units are leases of the handle that took them)",
                    obj=self._what, backend="dask")
            self._held -= n
        for _ in range(n):
            self._sem.release()

    @property
    def value(self) -> int:
        """Leases free now, cluster-wide (one scheduler round trip; a snapshot)."""
        self._check()
        return self.max_value - int(self._sem.get_value())

    def __enter__(self) -> DaskSemaphore:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def close(self) -> None:
        """Give back the leases this handle holds and stop using it; twice is harmless."""
        if self._closed or os.getpid() != self._pid:
            self._closed = True
            return
        with self._count_lock:
            held, self._held = self._held, 0
        try:
            for _ in range(held):
                self._sem.release()
        finally:
            self._closed = True
            self._stop_refreshing(self._sem)

    def unlink(self) -> None:
        """Forget the semaphore in the scheduler, with its leases.  Handles that still use
        it get ObjectNotFoundError; a new handle makes a new semaphore."""
        self._check()
        self._client.set_metadata(cluster_key("semaphore", self._plain_name), None)
        self._sem.close()
