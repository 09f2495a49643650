"""The ``buffer`` scenario: a bounded ring buffer shared by producers and consumers.

Two semaphores count empty and full slots, and they are always ipcfork Semaphores: they
are exact whatever the guard, so the number of deliveries always equals the number of
items produced.  The guard protects the ring's ``head`` (where producers write) and
``tail`` (where consumers read), one lock each.  Unguarded, two producers can read the same
``head`` and write the same slot, so one item is overwritten (lost) and a slot nobody wrote
this lap is delivered instead (an old item again: duplicated; or, on the first lap, no item
at all, counted as duplicated too).  Since deliveries equal productions, lost and duplicated
deliveries come in equal numbers.

Every worker is both a producer and a consumer: it puts one item, then takes one, K times,
which never deadlocks (a worker waits for a full slot only after adding an item) and works
for any number of workers.  Each item has a unique id; each worker records the ids it
receives in its own part of a shared array (it receives exactly K), so the record itself
never races, and the parent counts how often each id arrived.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..errors import WaitTimeoutError
from ..semaphore import Semaphore
from .guards import GuardSpec, make_lock
from .scenario import Config, Scenario, Tally, chunks, shared_view

__all__ = ["CAPACITY", "BufferScenario"]

CAPACITY = 8  # slots: fewer than the items in flight, so producers do wait
HEAD, TAIL = CAPACITY, CAPACITY + 1  # indices of the ring's two counters after the slots
EMPTY_SLOT = -1  # what a slot holds before anything was written to it
SLOT_WAIT = 60.0  # seconds a worker waits for a slot before calling the run broken


class BufferScenario(Scenario):
    """Bounded producer/consumer: count items lost and duplicated."""

    name = "buffer"
    description = "bounded producer/consumer ring; items lost or duplicated"
    kinds = frozenset({"none", "lock"})
    not_applicable = "an atomic add cannot guard a ring's head and tail"

    def __init__(self, config: Config, guard: GuardSpec, stack: contextlib.ExitStack) -> None:
        super().__init__(config, guard, stack)
        self.items = config.workers * config.iterations
        self.ring = shared_view(stack, "q", CAPACITY + 2)
        for slot in range(CAPACITY):
            self.ring[slot] = EMPTY_SLOT
        # Delivery i of worker w lands in received[w*K + i]: each worker writes its own part.
        self.received = shared_view(stack, "q", self.items)
        self.empty = Semaphore(CAPACITY)
        stack.callback(self.empty.close)
        self.full = Semaphore(0)
        stack.callback(self.full.close)
        if guard.kind == "lock":  # head and tail: producers and consumers do not collide
            self.locks = [make_lock(guard.name, stack), make_lock(guard.name, stack)]

    def work(self, worker: int, report: Callable[[int], None]) -> None:
        first = worker * self.config.iterations
        for size, done in chunks(self.config.iterations):
            ids = range(first + done - size, first + done)
            if self.locks:
                self._locked(ids, self.locks[0].raw, self.locks[1].raw)
            else:
                self._unguarded(ids)
            report(done)

    def _take(self, sem: Semaphore) -> None:
        if not sem.acquire(timeout=SLOT_WAIT):
            raise WaitTimeoutError(f"no {'free' if sem is self.empty else 'full'} slot in "
                                   f"{SLOT_WAIT} s: the ring is broken", limit=f"{SLOT_WAIT} s")

    def _unguarded(self, ids: range) -> None:
        ring, received, gap, take = self.ring, self.received, self.gap, self._take
        empty, full = self.empty, self.full
        for item in ids:  # ids are also where this worker records its deliveries
            take(empty)
            head = ring[HEAD]
            if gap is not None:
                gap()
            ring[head % CAPACITY] = item
            ring[HEAD] = head + 1
            full.release()
            take(full)
            tail = ring[TAIL]
            if gap is not None:
                gap()
            got = ring[tail % CAPACITY]
            ring[TAIL] = tail + 1
            empty.release()
            received[item] = got

    def _locked(self, ids: range, head_lock: Any, tail_lock: Any) -> None:
        ring, received, gap, take = self.ring, self.received, self.gap, self._take
        empty, full = self.empty, self.full
        for item in ids:
            take(empty)
            with head_lock:
                head = ring[HEAD]
                if gap is not None:
                    gap()
                ring[head % CAPACITY] = item
                ring[HEAD] = head + 1
            full.release()
            take(full)
            with tail_lock:
                tail = ring[TAIL]
                if gap is not None:
                    gap()
                got = ring[tail % CAPACITY]
                ring[TAIL] = tail + 1
            empty.release()
            received[item] = got

    def tally(self, results: list[Any]) -> Tally:
        counts = [0] * self.items
        nothing = 0  # deliveries of a slot nobody had written yet
        for got in self.received.tolist():
            if got >= 0:
                counts[got] += 1
            else:
                nothing += 1
        lost = sum(1 for c in counts if c == 0)
        once = sum(1 for c in counts if c == 1)
        duplicated = sum(c - 1 for c in counts if c > 1) + nothing
        return Tally(expected=self.items, observed=once, updates=self.items, lost=lost,
                     duplicated=duplicated, exact=lost == 0 and duplicated == 0)
