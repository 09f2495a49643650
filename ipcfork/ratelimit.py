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

from ._common import describe
from ._os.timeouts import Deadline, check_timeout
from .errors import InvalidArgumentError
from .mutex import companion_lock
from .shm import SharedMemory

__all__ = ["RateLimiter"]

MAX_RATE = 1_000_000
_HEADER = 3  # words before the ring: rate, per (a double), acquisitions so far


class RateLimiter:
    """At most ``rate`` acquisitions in any window of ``per`` seconds, across processes.

    ``with limiter:`` waits for its turn; ``acquire(blocking=True, timeout=None) -> bool``
    as for locks.  ``name`` and the other options work as for :class:`SharedMemory` (the
    lock is ``<name>.lock``, or ``ftok(path, proj + 1)`` for sysv).  A named limiter keeps
    the ``rate`` and ``per`` it was made for.  Raises InvalidArgumentError for a rate
    outside 1..1,000,000 or a ``per`` that is not > 0, and when an existing named limiter
    was made for another ``rate`` or ``per`` (the message names both).
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
        self._what = describe("RateLimiter", name, backend)
        self._shm = SharedMemory(8 * (_HEADER + rate), name, backend=backend, create=create,
                                 allow_foreign=allow_foreign, proj=proj)
        size = self._shm.size
        if size < 8 * (_HEADER + 1) or size % 8:
            self._shm.close()
            raise InvalidArgumentError(
                f"{self._what} has {size} bytes: not a RateLimiter's segment", obj=self._what,
                backend=backend, limit=f"a multiple of 8 bytes >= {8 * (_HEADER + 1)}")
        buf = self._shm.buf
        self._rate = buf[:8].cast("q")  # the parameters it was made for
        self._per = buf[8:16].cast("d")
        self._head = buf[16:24].cast("q")  # acquisitions so far
        self._times = buf[24:].cast("d")  # the last ``rate`` of them, a ring
        try:
            self.lock = companion_lock(name, backend=backend, create=create,
                                       allow_foreign=allow_foreign, proj=proj)
        except BaseException:
            self._release_views()
            raise
        try:
            self._check_parameters(backend)
        except BaseException:
            self.close()
            raise

    def _check_parameters(self, backend: str) -> None:
        """Record ``rate`` and ``per`` in a new limiter; compare them with an existing one's.

        Raises InvalidArgumentError naming both sets of values if they differ.
        """
        with self.lock:
            # The first to take the lock records its parameters; the segment's size says
            # which rate it was made for even before that.
            made_for = len(self._times)
            if self._rate[0] == 0 and made_for == self.rate:
                self._rate[0], self._per[0] = self.rate, self.per
                return
            stored_rate = int(self._rate[0]) or made_for
            stored_per = float(self._per[0])
        if (stored_rate, stored_per) != (self.rate, self.per):
            per = f"{stored_per}" if stored_per else "?"
            raise InvalidArgumentError(
                f"{self._what} was made for rate={stored_rate} per={per} s, not "
                f"rate={self.rate} per={self.per} s",
                obj=self._what, backend=backend, limit=f"rate={stored_rate}, per={per} s")

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

    def _release_views(self) -> None:
        for view in (self._rate, self._per, self._head, self._times):
            view.release()
        self._shm.close()

    def close(self) -> None:
        """Drop this process's handles."""
        self._release_views()
        self.lock.close()

    def unlink(self) -> None:
        """Remove a named limiter system-wide."""
        self._shm.unlink()
        self.lock.unlink()
