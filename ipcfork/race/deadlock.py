"""The ``deadlock`` scenario: locks taken in opposite order.

With two workers, worker 0 takes lock A then lock B and worker 1 takes B then A.  More
workers form a ring (worker i takes lock i, then lock i+1 modulo N: the dining
philosophers), which is the same cycle.  A barrier between the first and the second
acquisition makes the deadlock certain instead of likely: every worker holds its first lock
before any asks for its second.  The second acquisition has a timeout, so the run ends and
reports how many workers gave up instead of hanging.  Deadlocking is what this scenario
shows, so it is no failure of the guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..barrier import Barrier
from ..errors import WaitTimeoutError
from .guards import GuardSpec, make_lock
from .scenario import Config, Scenario, Tally

__all__ = ["DeadlockScenario"]

_FIRST_WAIT = 30.0  # seconds for the uncontended first acquisition and the barrier


class DeadlockScenario(Scenario):
    """Each worker holds one lock and waits, with a timeout, for its neighbour's."""

    name = "deadlock"
    description = "workers take two locks in opposite order (a ring); timeouts end it"
    kinds = frozenset({"lock"})
    not_applicable = "no lock, so nothing to deadlock on"
    judged = False

    def __init__(self, config: Config, guard: GuardSpec, stack: contextlib.ExitStack) -> None:
        super().__init__(config, guard, stack)
        self.locks = [make_lock(guard.name, stack) for _ in range(config.workers)]
        self.holding = Barrier(config.workers)
        stack.callback(self.holding.close)

    @classmethod
    def workers_for(cls, requested: int) -> int:
        return max(2, requested)  # a cycle needs two

    @classmethod
    def iterations_for(cls, requested: int) -> int:
        return 1  # one round: it deadlocks every time

    def work(self, worker: int, report: Callable[[int], None]) -> bool:
        """True if this worker got both locks, False if its second acquisition timed out.

        Raises WaitTimeoutError if the first, uncontended lock cannot be had.
        """
        first = self.locks[worker]
        second = self.locks[(worker + 1) % len(self.locks)]
        if not first.acquire(_FIRST_WAIT):
            self.holding.abort()  # do not leave the others waiting at the barrier
            raise WaitTimeoutError(f"worker {worker} could not take its own lock",
                                   limit=f"{_FIRST_WAIT} s")
        try:
            self.holding.wait(timeout=_FIRST_WAIT)  # every worker holds its first lock
            got = second.acquire(self.config.lock_timeout)
            if got:
                second.release()
        finally:
            first.release()
        report(1)
        return got

    def tally(self, results: list[Any]) -> Tally:
        workers = len(results)
        finished = sum(1 for got in results if got)
        stuck = workers - finished
        note = (f"deadlock: {stuck} of {workers} workers gave up waiting "
                f"{self.config.lock_timeout:g} s for their second lock" if stuck
                else "no deadlock: every worker got both locks")
        return Tally(expected=workers, observed=finished, updates=workers, lost=0,
                     exact=stuck == 0, deadlocked=stuck, note=note)
