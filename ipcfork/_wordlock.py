"""A lock that is one 64-bit word of shared memory: 0 when free, else its holder's token.

Taking it is a single compare-and-swap that writes the taker's token, so taking the lock and
recording who holds it are one step: a holder killed at any instruction leaves its token
behind, and the next taker, seeing that process gone, takes over with one more
compare-and-swap.  (A semaphore plus an owner word, as in :class:`~ipcfork.Mutex`, has a
few instructions between the two in which a SIGKILL orphans the lock.)

Waiting is polling with a growing sleep, so it suits locks held for microseconds and taken
rarely, as SharedCounter's are; the holder's liveness is read from ``/proc`` only after a
millisecond of waiting.  Threads of one process share its token, so a process-local lock
orders them first.
"""

from __future__ import annotations

import threading
import time
from ctypes import byref, c_int64, c_void_p

from ._atomic import SEQ_CST, Atomics
from ._identity import IDENTITY, token_alive

__all__ = ["WordLock"]

_U64 = (1 << 64) - 1
_FIRST_SLEEP, _LONGEST_SLEEP = 20e-6, 1e-3
_LIVENESS_AFTER = 1e-3  # seconds of waiting before the holder's liveness is checked


def _signed(token: int) -> int:
    return token - (1 << 64) if token >> 63 else token


class WordLock:
    """The lock word at ``address`` (8-byte aligned shared memory that outlives us)."""

    def __init__(self, ops: Atomics, address: int) -> None:
        self._ops = ops
        self._word = c_void_p(address)
        self._local = threading.Lock()
        self.previous_owner_died = False

    def after_fork_in_child(self) -> None:
        """A thread of the parent may have held the local lock at the fork."""
        self._local = threading.Lock()

    def _swap(self, expected: int, new: int) -> int | None:
        """Compare-and-swap; None on success, else the holder's token seen."""
        was = c_int64(expected)
        if self._ops.cas(self._word, byref(was), c_int64(new), SEQ_CST, SEQ_CST):
            return None
        return was.value & _U64

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if it is held."""
        if not self._local.acquire(blocking):
            return False
        try:
            if self._take(blocking):
                return True
        except BaseException:
            self._local.release()
            raise
        self._local.release()
        return False

    def _take(self, blocking: bool) -> bool:
        me = _signed(IDENTITY.token)
        sleep, waited = _FIRST_SLEEP, 0.0
        while True:
            holder = self._swap(0, me)
            if holder is None:
                self.previous_owner_died = False
                return True
            if (waited >= _LIVENESS_AFTER or not blocking) and not token_alive(holder):
                if self._swap(_signed(holder), me) is None:  # take over from the dead
                    self.previous_owner_died = True
                    return True
                continue
            if not blocking:
                return False
            time.sleep(sleep)
            waited += sleep
            sleep = min(2 * sleep, _LONGEST_SLEEP)

    def release(self) -> None:
        """Give the lock back (the caller holds it)."""
        self._swap(_signed(IDENTITY.token), 0)
        self._local.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
