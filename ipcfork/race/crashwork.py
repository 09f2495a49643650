"""What the ``crash`` scenario's workers share and do: the counter, the bookkeeping, and
the loops that run until the worker is killed.

One shared array of 64-bit words: word 0 is the counter (lock guards; the atomic guard
counts in an ``ipcfork.SharedCounter`` instead), then three words per worker position:

``done``
    increments this position recorded.  Written inside the critical section, right after
    the counter, so a kill between the two leaves the counter one ahead of the record
    (*in flight*) and never behind: a counter below the recorded total means two workers
    were inside at once.
``inside``
    1 from the first to the last statement inside the critical section.  The parent reads
    it once the victim is reaped: 1 means the victim died holding the lock.  A kill in the
    few instructions of the acquire or release around it is not seen, so this counts a
    lower bound of the kills inside.
``died``
    acquisitions after which the guard said the previous owner had died
    (``ipcfork.Mutex.previous_owner_died``); only guards that can tell keep it.

Only one process at a time has a position (the parent reaps a victim before it forks the
replacement), so the per-position words are never raced.
"""

from __future__ import annotations

import contextlib
from typing import Any, NoReturn

from ..mutex import Mutex
from .guards import AtomicCounter, GuardSpec, LockHandle, make_counter, make_lock
from .scenario import shared_view

__all__ = ["Target"]

_DONE, _INSIDE, _DIED = 0, 1, 2  # offsets of a position's words
_WORDS = 3  # words per position


class Target:
    """The shared state under fire, made in the parent before any fork."""

    def __init__(self, spec: GuardSpec, workers: int, stack: contextlib.ExitStack) -> None:
        """Create the counter, the bookkeeping and the guard; ``stack`` closes them.

        Raises as :func:`~.guards.make_lock` and :func:`~.guards.make_counter` do.
        """
        self.workers = workers
        self.view = shared_view(stack, "q", 1 + _WORDS * workers)
        self.lock: LockHandle | None = None
        self.atomic: AtomicCounter | None = None
        if spec.kind == "atomic":
            self.atomic = make_counter(stack)
        else:
            self.lock = make_lock(spec.name, stack)
        # Only ipcfork.Mutex tells its next holder that the previous one died.
        self.notices = self.lock is not None and isinstance(self.lock.raw, Mutex)

    @property
    def has_critical_section(self) -> bool:
        """False for the atomic guard: each increment is one atomic add."""
        return self.lock is not None

    def _word(self, position: int, offset: int) -> int:
        return 1 + _WORDS * position + offset

    def recorded(self) -> int:
        """Increments recorded by every position (a snapshot while workers run)."""
        view = self.view
        return sum(view[self._word(i, _DONE)] for i in range(self.workers))

    def observed(self) -> int:
        """The counter's value (exact once every worker is gone)."""
        return int(self.atomic.value) if self.atomic is not None else int(self.view[0])

    def owner_deaths(self) -> int | None:
        """Owner deaths the guard reported, or None if it cannot report them."""
        if not self.notices:
            return None
        return sum(self.view[self._word(i, _DIED)] for i in range(self.workers))

    def take_flag(self, position: int) -> int:
        """1 if the (reaped) worker at ``position`` died inside the critical section, and
        clear the flag for its replacement."""
        word = self._word(position, _INSIDE)
        inside = int(self.view[word])
        self.view[word] = 0
        return inside

    def work(self, position: int) -> NoReturn:
        """The worker at ``position`` (runs in the child): increment until killed."""
        if self.atomic is not None:
            self._atomic(position, self.atomic)
        assert self.lock is not None
        self.lock.attach()
        if self.notices:
            self._noticing(position, self.lock.raw)
        self._locked(position, self.lock.raw)

    def _locked(self, position: int, lock: Any) -> NoReturn:
        view = self.view
        done, inside = self._word(position, _DONE), self._word(position, _INSIDE)
        while True:
            with lock:
                view[inside] = 1
                view[0] += 1
                view[done] += 1
                view[inside] = 0

    def _noticing(self, position: int, lock: Any) -> NoReturn:
        view = self.view
        done, inside = self._word(position, _DONE), self._word(position, _INSIDE)
        died = self._word(position, _DIED)
        while True:
            with lock:
                view[inside] = 1
                if lock.previous_owner_died:
                    view[died] += 1
                view[0] += 1
                view[done] += 1
                view[inside] = 0

    def _atomic(self, position: int, counter: AtomicCounter) -> NoReturn:
        view, add = self.view, counter.add
        done = self._word(position, _DONE)
        while True:
            add(1)
            view[done] += 1
