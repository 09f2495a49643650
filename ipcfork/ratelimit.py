"""A rate limiter shared by processes: at most ``rate`` acquisitions in any ``per`` seconds.

Children calling a rate-limited API together (e-mail, geocoding, billing) stay under the
limit however many there are.  It keeps the times of the last ``rate`` acquisitions in
shared memory (a sliding-window log, guarded by a robust :class:`Mutex`), so the guarantee is
exact for every window, not only on average as with a token bucket: an acquisition is
allowed when the ``rate``-th previous one is at least ``per`` seconds old.  Times come from
``CLOCK_MONOTONIC``, which every process on the machine shares.
"""

from __future__ import annotations

import math
import os
import time
from types import TracebackType

from ._timeouts import Deadline, check_timeout
from .errors import InvalidArgumentError
from .mutex import companion_lock
from .shm import SharedMemory

__all__ = ["RateLimiter"]

MAX_RATE = 1_000_000


class RateLimiter:
    """At most ``rate`` acquisitions in any window of ``per`` seconds, across processes.

    ``with limiter:`` waits for its turn; ``acquire(blocking=True, timeout=None) -> bool``
    as for locks.  ``name`` and the other options work as for :class:`SharedMemory` (the
    lock is ``<name>.lock``, or ``ftok(path, proj + 1)`` for sysv).  Raises
    InvalidArgumentError for a rate outside 1..1,000,000 or a ``per`` that is not > 0.
    """

    def __init__(self, rate: int, per: float = 1.0, name: str | os.PathLike[str] | None = None,
                 *, backend: str = "posix", create: bool = True, allow_foreign: bool = False,
                 proj: int | str = "i") -> None:
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_RATE:
            raise InvalidArgumentError(f"rate must be an int in 1..{MAX_RATE}, not {rate!r}",
                                       limit=f"1..{MAX_RATE}")
        if isinstance(per, bool) or not isinstance(per, (int, float)) or not (
                per > 0 and math.isfinite(per)):
            raise InvalidArgumentError(f"per must be a number of seconds > 0, not {per!r}",
                                       limit="> 0")
        self.rate, self.per = rate, float(per)
        self._shm = SharedMemory(8 * (1 + rate), name, backend=backend, create=create,
                                 allow_foreign=allow_foreign, proj=proj)
        self._head = self._shm.buf[:8].cast("q")  # acquisitions so far
        self._times = self._shm.buf[8:].cast("d")  # the last ``rate`` of them, a ring
        self.lock = companion_lock(name, backend=backend, create=create,
                                   allow_foreign=allow_foreign, proj=proj)

    def _try(self) -> float:
        """Take a turn if the window allows: 0.0, else the seconds until it might."""
        with self.lock:
            now = time.monotonic()
            slot = self._head[0] % self.rate
            oldest = self._times[slot]
            if oldest == 0.0 or now - oldest >= self.per:
                self._times[slot] = now
                self._head[0] += 1
                return 0.0
            return self.per - (now - oldest)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a turn; True if taken, False if ``timeout`` passed (or at once when not
        ``blocking``).  Raises InvalidArgumentError for a negative timeout."""
        deadline = Deadline(check_timeout(timeout))
        while True:
            wait = self._try()
            if wait == 0.0:
                return True
            remaining = deadline.remaining()
            if not blocking or remaining == 0.0:
                return False
            # Waiting for time itself to pass is this object's job, not synchronisation.
            time.sleep(wait if remaining is None else min(wait, remaining))

    @property
    def taken(self) -> int:
        """How many turns were taken since the limiter was created."""
        return int(self._head[0])

    def __enter__(self) -> RateLimiter:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def close(self) -> None:
        """Drop this process's handles."""
        self._head.release()
        self._times.release()
        self._shm.close()
        self.lock.close()

    def unlink(self) -> None:
        """Remove a named limiter system-wide."""
        self._shm.unlink()
        self.lock.unlink()
