"""What every scenario shares: its configuration, its verdict (:class:`Tally`), the widened
gap between read and write, and shared arrays that close with the run.

A scenario object lives in three places in turn: it is made in the parent (shared state
created before the fork, so workers inherit it), :meth:`Scenario.attach` and
:meth:`Scenario.work` run in each forked worker, and :meth:`Scenario.tally` runs back in the
parent once every worker has exited.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..shm import SharedMemory
from .guards import GuardSpec, LockHandle

__all__ = ["CHUNK", "Config", "Scenario", "Tally", "chunks", "make_gap", "shared_view"]

CHUNK = 1024  # iterations between two progress reports: keeps the report off the hot loop


@dataclass(frozen=True)
class Config:
    """One run's knobs: workers, iterations per worker, read-to-write window (seconds),
    random seed, and how long a lock acquisition may wait in the deadlock scenario."""

    workers: int
    iterations: int
    window: float
    seed: int
    lock_timeout: float


@dataclass(frozen=True)
class Tally:
    """What a run produced, as the scenario judges it.

    ``updates`` is how many updates were attempted (the denominator of the lost
    percentage); ``exact`` says whether the shared state is what it must be.
    """

    expected: int
    observed: int
    updates: int
    lost: int
    exact: bool
    duplicated: int = 0
    deadlocked: int = 0
    note: str | None = None


class Scenario(ABC):
    """A race: shared state, the workers' loop, and the verdict."""

    name: ClassVar[str]
    description: ClassVar[str]
    kinds: ClassVar[frozenset[str]]  # the guard kinds it can use
    not_applicable: ClassVar[str] = ""  # why other guard kinds cannot be used
    judged: ClassVar[bool] = True  # False: a guarded run that is not exact is no failure

    def __init__(self, config: Config, guard: GuardSpec, stack: contextlib.ExitStack) -> None:
        """Create the shared state in the parent; ``stack`` closes it after the run."""
        self.config = config
        self.guard = guard
        self.gap = make_gap(config.window)
        self.locks: list[LockHandle] = []  # every lock the workers use, for attach()

    @classmethod
    def workers_for(cls, requested: int) -> int:
        """How many workers a run asked for ``requested`` actually forks."""
        return requested

    @classmethod
    def iterations_for(cls, requested: int) -> int:
        """How many iterations each worker actually does."""
        return requested

    def attach(self) -> None:
        """Per-process set-up in each worker, after the fork and before the start."""
        for lock in self.locks:
            lock.attach()

    def prepare(self, worker: int) -> None:
        """Work a worker does before the start line (outside the timed part): nothing by
        default."""
        del worker

    @abstractmethod
    def work(self, worker: int, report: Callable[[int], None]) -> Any:
        """The worker's loop (runs in the child); calls ``report(done)`` now and then.

        Its return value, pickled back, is handed to :meth:`tally`.
        """

    @abstractmethod
    def tally(self, results: list[Any]) -> Tally:
        """Judge the shared state after every worker exited (runs in the parent)."""


def chunks(total: int) -> Iterator[tuple[int, int]]:
    """``(size, done_after)`` for consecutive chunks of at most :data:`CHUNK` of ``total``."""
    done = 0
    while done < total:
        size = min(CHUNK, total - done)
        done += size
        yield size, done


def make_gap(window: float) -> Callable[[], None] | None:
    """The pause between a read and its write: None for no pause.

    It first yields the CPU, so on a single core another worker runs (and reads the same
    stale value) before this one writes; then it spins until ``window`` seconds have passed,
    which keeps the gap the same length on an idle multi-core machine, where a yield returns
    at once.  A spin rather than ``time.sleep``: a sleep is at least the timer slack (about
    50 microseconds here), so short windows would all be the same.
    """
    if window <= 0:
        return None
    clock = time.perf_counter
    yield_cpu = os.sched_yield

    def gap() -> None:
        end = clock() + window
        yield_cpu()
        while clock() < end:
            pass

    return gap


def shared_view(stack: contextlib.ExitStack, typecode: str, length: int,
                fill: int = 0) -> memoryview:
    """A zero-filled (or ``fill``-filled) typed array in anonymous shared memory, made now
    so forked workers inherit it; the view is released and the segment closed with
    ``stack``.  Raises LimitExceededError if /dev/shm has no room."""
    shm = SharedMemory(length * struct.calcsize(typecode))
    stack.callback(shm.close)
    view: memoryview = shm.buf.cast(typecode)  # type: ignore[call-overload]
    stack.callback(view.release)  # before the close above: a live view refuses the close
    if fill:
        for i in range(length):
            view[i] = fill
    return view
