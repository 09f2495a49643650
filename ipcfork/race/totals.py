"""Scenarios about shared totals: ``counter`` (one counter everybody increments) and
``transfer`` (money moved between accounts; the sum must not change).

Each has three loops, one per guard kind, written out rather than parametrised: the loop is
what is being measured, so no call or branch is added that the guard itself does not need.
With the atomic guard there is no read-modify-write to widen, so the window is spent before
the add (the time to compute the update) and is not serialised, which is the point.
"""

from __future__ import annotations

import array
import contextlib
import random
from collections.abc import Callable
from typing import Any

from .guards import AtomicCounter, GuardSpec, LockHandle, make_counter, make_lock
from .scenario import Config, Scenario, Tally, chunks, shared_view

__all__ = ["ACCOUNTS", "INITIAL_BALANCE", "CounterScenario", "TransferScenario"]

ACCOUNTS = 8  # few accounts: transfers collide often
INITIAL_BALANCE = 1_000_000  # far above any walk of amounts <= 100: balances stay positive
MAX_AMOUNT = 100


class CounterScenario(Scenario):
    """N workers each increment one shared counter K times; expected N*K."""

    name = "counter"
    description = "N workers increment one shared counter K times"
    kinds = frozenset({"none", "lock", "atomic"})

    def __init__(self, config: Config, guard: GuardSpec, stack: contextlib.ExitStack) -> None:
        super().__init__(config, guard, stack)
        self.lock: LockHandle | None = None
        self.atomic: AtomicCounter | None = None
        self.cell: memoryview | None = None
        if guard.kind == "atomic":
            self.atomic = make_counter(stack)
        else:
            self.cell = shared_view(stack, "q", 1)
            if guard.kind == "lock":
                self.lock = make_lock(guard.name, stack)
                self.locks.append(self.lock)

    def work(self, worker: int, report: Callable[[int], None]) -> None:
        for size, done in chunks(self.config.iterations):
            if self.atomic is not None:
                self._atomic(size, self.atomic)
            elif self.lock is not None:
                self._locked(size, self.lock.raw)
            else:
                self._unguarded(size)
            report(done)

    def _unguarded(self, n: int) -> None:
        cell, gap = self.cell, self.gap
        assert cell is not None
        for _ in range(n):
            value = cell[0]
            if gap is not None:
                gap()
            cell[0] = value + 1

    def _locked(self, n: int, lock: Any) -> None:
        cell, gap = self.cell, self.gap
        assert cell is not None
        for _ in range(n):
            with lock:
                value = cell[0]
                if gap is not None:
                    gap()
                cell[0] = value + 1

    def _atomic(self, n: int, counter: AtomicCounter) -> None:
        add, gap = counter.add, self.gap
        for _ in range(n):
            if gap is not None:
                gap()
            add(1)

    def tally(self, results: list[Any]) -> Tally:
        expected = self.config.workers * self.config.iterations
        observed = int(self.atomic.value if self.atomic is not None
                       else self.cell[0])  # type: ignore[index]
        return Tally(expected=expected, observed=observed, updates=expected,
                     lost=expected - observed, exact=observed == expected)


class TransferScenario(Scenario):
    """Random transfers between shared accounts; the total must not change.

    Each account has a balance and a version that every transfer touching it bumps in the
    same read-modify-write, so the versions count the updates that were lost: a transfer
    updates two accounts, ``2*N*K`` updates in all.
    """

    name = "transfer"
    description = "random transfers between shared accounts; the total must not change"
    kinds = frozenset({"none", "lock", "atomic"})

    def __init__(self, config: Config, guard: GuardSpec, stack: contextlib.ExitStack) -> None:
        super().__init__(config, guard, stack)
        self.lock: LockHandle | None = None
        self.atomic: list[AtomicCounter] = []  # balances, then versions
        self.book: memoryview | None = None
        self._plan = (array.array("B"), array.array("B"), array.array("l"))  # prepare()
        if guard.kind == "atomic":
            self.atomic = [make_counter(stack, INITIAL_BALANCE) for _ in range(ACCOUNTS)]
            self.atomic += [make_counter(stack) for _ in range(ACCOUNTS)]
        else:
            self.book = shared_view(stack, "q", 2 * ACCOUNTS)
            for i in range(ACCOUNTS):
                self.book[i] = INITIAL_BALANCE
            if guard.kind == "lock":
                self.lock = make_lock(guard.name, stack)
                self.locks.append(self.lock)

    def prepare(self, worker: int) -> None:
        """Draw this worker's transfers before the start line, so the timed loop only
        moves money; three compact arrays (6 bytes a transfer), not a list of tuples."""
        rng = random.Random(self.config.seed * 1_000_003 + worker)
        self._plan = (array.array("B"), array.array("B"), array.array("l"))
        sources, targets, amounts = self._plan
        for _ in range(self.config.iterations):
            src, dst = rng.sample(range(ACCOUNTS), 2)
            sources.append(src)
            targets.append(dst)
            amounts.append(rng.randint(1, MAX_AMOUNT))

    def work(self, worker: int, report: Callable[[int], None]) -> None:
        sources, targets, amounts = self._plan
        for size, done in chunks(len(amounts)):
            part = list(zip(sources[done - size:done], targets[done - size:done],
                            amounts[done - size:done], strict=True))
            if self.atomic:
                self._atomic(part)
            elif self.lock is not None:
                self._locked(part, self.lock.raw)
            else:
                self._unguarded(part)
            report(done)

    def _unguarded(self, plan: list[tuple[int, int, int]]) -> None:
        book, gap, v = self.book, self.gap, ACCOUNTS
        assert book is not None
        for src, dst, amount in plan:
            a, b, va, vb = book[src], book[dst], book[v + src], book[v + dst]
            if gap is not None:
                gap()
            book[src], book[dst], book[v + src], book[v + dst] = (
                a - amount, b + amount, va + 1, vb + 1)

    def _locked(self, plan: list[tuple[int, int, int]], lock: Any) -> None:
        book, gap, v = self.book, self.gap, ACCOUNTS
        assert book is not None
        for src, dst, amount in plan:
            with lock:
                a, b, va, vb = book[src], book[dst], book[v + src], book[v + dst]
                if gap is not None:
                    gap()
                book[src], book[dst], book[v + src], book[v + dst] = (
                    a - amount, b + amount, va + 1, vb + 1)

    def _atomic(self, plan: list[tuple[int, int, int]]) -> None:
        counters, gap, v = self.atomic, self.gap, ACCOUNTS
        for src, dst, amount in plan:
            if gap is not None:
                gap()
            counters[src].add(-amount)
            counters[dst].add(amount)
            counters[v + src].add(1)
            counters[v + dst].add(1)

    def tally(self, results: list[Any]) -> Tally:
        if self.atomic:
            values = [int(c.value) for c in self.atomic]
        else:
            assert self.book is not None
            values = self.book.tolist()
        expected = ACCOUNTS * INITIAL_BALANCE
        observed = sum(values[:ACCOUNTS])
        updates = 2 * self.config.workers * self.config.iterations
        lost = updates - sum(values[ACCOUNTS:])
        return Tally(expected=expected, observed=observed, updates=updates, lost=lost,
                     exact=observed == expected and lost == 0)
