"""SharedCounter: a 64-bit counter for a fork family, lock-free to add to, linearizable to
read-and-update.

Layout (one segment): a header line (``pending``, a mode hint, ``frozen_sum``, a magic
word), a line holding the counter's robust mutex (the native core's block), and 64
*stripes* of 128 bytes each, so that no two stripes share a cache line or an adjacent-line
prefetch pair (``word``, ``owner``, ``pin``, ``record``).  A stripe word holds its count
shifted left by one; bit 0 is FROZEN.

``add`` runs in one of two regimes, chosen by the last linearizable operation:

* **Striped** (at the start, and after many plain adds): each process claims a stripe and
  adds to it with one fetch-and-add on its own cache line, so processes never contend.  The
  total is ``pending`` plus every stripe's count.
* **Central** (after ``add_and_get`` or ``compare_and_set``): every stripe is frozen, its
  count written in its ``record``, their sum in ``frozen_sum``; the total is
  ``pending + frozen_sum`` and every operation is one atomic instruction on ``pending``,
  linearizable by construction.  An add that lands on a frozen stripe (its process had not
  seen the mode change) moves: ``pending += n``, then the stripe takes ``n`` back.  Until
  then the stripe holds a *transient* that nobody counts, since frozen stripes are read
  through their record.

Going central (freeze each stripe by compare-and-swap after writing its record, sum the
records, then clear the BLOCKED bit of every stripe's ``pin``) and going back (set every
BLOCKED bit; give up if a live thread holds a pin; unfreeze each stripe by a
compare-and-swap that fails while a transient is in it) happen under the counter's robust
mutex (the kernel releases it when its holder dies at any point, and the next holder
completes what the dead one left).  A
linearizable operation *pins* its stripe once (one fetch-and-add that
also tells it, through the BLOCKED bit, whether the counter is central) and keeps the pin
until its thread next tries to go back to stripes.  Invariant: while any pin is unblocked,
every stripe is frozen and ``frozen_sum`` is right.  Every step is idempotent and ordered
so that a holder killed half-way leaves a state the next holder completes; a record is
written before the compare-and-swap that freezes its stripe, so a frozen stripe's record
is always exact.

Each thread in each process has a *lane* (its stripe's offsets and a pin flag); a forked
child starts without lanes and claims its own stripe on first use.  The two common cases,
a striped ``add`` and a pinned ``add_and_get``, are C methods of the native core's
``CounterCore`` working on the lane that the Python paths below cache for one thread
(``_cache_lane``); everything else, and everything on the ctypes fallback, runs here.
"""


from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ._common import ClosingContext
from ._counter_layout import (
    _BLOCKED,
    _CENTRAL,
    _COUNT_MASK,
    _FROZEN,
    _FROZEN_SUM,
    _LOCK,
    _MAGIC,
    _MAGIC_VALUE,
    _MODE,
    _OWNER,
    _OWNERS,
    _PENDING,
    _PIN,
    _RECORD,
    _RECORDS,
    _RETIRE,
    _SLOW_BITS,
    _SMALL,
    _STRIPE_AT,
    _STRIPED,
    _THAW_AFTER,
    _U64,
    _UNFREEZE_TRIES,
    _WORD,
    _WORDS,
    SIZE,
    STRIPES,
    _int64,
    _Lane,
    _LaneGuard,
    _wrap,
)
from ._os.identity import IDENTITY, token_alive
from ._os.native import AtomicWords, CounterCore, RobustMutex, bind_block
from .errors import ObjectClosedError, ObjectCorruptError
from .shm import SharedMemory

__all__ = ["SharedCounter"]

class _Closed:
    """Stands in for the lanes of a closed counter: every use raises."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, attribute: str) -> Any:
        raise ObjectClosedError(f"{self._what} is closed", obj=self._what)


_LIVE: weakref.WeakSet[SharedCounter] = weakref.WeakSet()


def _drop_dead_thread_pin(counter_ref: weakref.ref[SharedCounter], lane: _Lane,
                          pid: int) -> None:
    counter = counter_ref()
    if counter is not None and counter._open and lane.pinned and os.getpid() == pid:
        counter._unpin(lane)


def _unpin_all(atomics: Any, pinned: list[_Lane], _segment: SharedMemory, pid: int) -> None:
    """Finalizer: drop the pins of a counter that was never closed (in its own process
    only: a forked child's copy of the list holds the parent's pins)."""
    if os.getpid() == pid:
        for lane in pinned:
            atomics.fetch_add(lane.pin, -1)
        pinned.clear()


def _forget_lanes_after_fork() -> None:
    for counter in list(_LIVE):
        if counter._open:
            counter._lanes = threading.local()
            counter._pinned = []  # the parent's pins are the parent's
            counter._finalizer.detach()
            counter._finalizer = weakref.finalize(counter, _unpin_all, counter._atomics,
                                                  counter._pinned, counter._shm, os.getpid())


os.register_at_fork(after_in_child=_forget_lanes_after_fork)


class SharedCounter(CounterCore, ClosingContext):  # type: ignore[misc]  # CounterCore is chosen at import
    """A signed 64-bit counter shared by processes (arithmetic wraps like a C ``int64_t``).

    ``add(n)`` never blocks and never loses an update; ``value`` reads the total (exact
    once adds have stopped; while they run, it counts every add that finished before the
    read began); ``add_and_get(n)`` and ``compare_and_set(expected, new)`` are
    linearizable.  Anonymous by default (share it with children through ``fork``) or named
    like :class:`SharedMemory` (one segment, nothing else).  ``initial`` is written only
    when the counter is created.

    Raises InvalidArgumentError for a value outside the int64 range, ObjectCorruptError
    when a named segment is not a SharedCounter.
    """

    def __new__(cls, *args: Any, backend: str = "posix", **options: Any) -> SharedCounter:
        if cls is SharedCounter and backend == "dask":  # ipcfork.dask: imported on first use
            from .dask.counter import DaskCounter

            cls = DaskCounter
        counter: SharedCounter = super().__new__(cls)
        return counter

    def __init__(self, initial: int = 0, name: str | os.PathLike[str] | None = None, *,
                 backend: str = "posix", create: bool = True, exclusive: bool = False,
                 allow_foreign: bool = False, proj: int | str = "i") -> None:
        _int64(initial, "initial")
        self._open = False
        self._lanes: Any = _Closed("SharedCounter (not yet open)")
        self._shm = SharedMemory(SIZE, name, backend=backend, create=create,
                                 exclusive=exclusive, allow_foreign=allow_foreign, proj=proj)
        self._what = f"SharedCounter {os.fspath(name)!r} ({backend})" if name else \
            "SharedCounter"
        self.created = self._shm.created
        self._atomics: Any = None
        self._lock: Any = None
        try:
            if self._shm.size < SIZE:
                raise ObjectCorruptError(f"{self._what} has {self._shm.size} bytes, a "
                                         f"SharedCounter needs {SIZE}", obj=self._what)
            self._buf = self._shm.buf
            self._atomics = AtomicWords(self._buf)
            self._check_magic()
            self._lock = RobustMutex()
            bind_block(self._lock, self._buf, _LOCK, self.created, f"{self._what} lock")
            self._counter_bind(self._buf, _PENDING, _MODE, _FROZEN_SUM)
            with self._lock:
                self._initialize(initial)
        except BaseException:
            self._let_go()
            raise
        self._lanes = threading.local()
        self._pinned: list[_Lane] = []
        # A counter dropped without close(): give back this process's pins, or every later
        # thaw would give up.  The finalizer holds the segment, so it is still mapped.
        self._finalizer = weakref.finalize(self, _unpin_all, self._atomics, self._pinned,
                                           self._shm, os.getpid())
        self._open = True
        _LIVE.add(self)

    def _check_magic(self) -> bool:
        """True once initialised, False while not yet.  Raises ObjectCorruptError when the
        segment holds something else."""
        magic = self._atomics.load(_MAGIC)
        if magic not in (0, _MAGIC_VALUE):
            raise ObjectCorruptError(f"{self._what} is not a SharedCounter (bad magic)",
                                     obj=self._what)
        return bool(magic)

    def _initialize(self, initial: int) -> None:
        if self._check_magic():
            return
        for line in _STRIPE_AT:  # striped: every pin blocked
            self._atomics.fetch_or(line + _PIN, _BLOCKED)
        self._atomics.store(_PENDING, initial)
        self._atomics.store(_MAGIC, _MAGIC_VALUE)

    def _let_go(self) -> None:
        """Drop every hold on the segment, then the segment (this process only)."""
        self._counter_unbind()
        if self._lock is not None and not self._lock._closed:
            self._lock._unbind()
        if self._atomics is not None:
            self._atomics.close()
        if hasattr(self, "_buf"):
            del self._buf
        self._shm.close()

    # -- lanes and stripes ------------------------------------------------------------------

    def _lane(self) -> _Lane:
        try:
            lane: _Lane = self._lanes.lane
        except AttributeError:
            lane = self._lanes.lane = _Lane(self._claim_stripe())
            # A thread that exits holding a pin would block every thaw for good: the
            # thread's locals die with it, and with them this guard, whose finalizer
            # drops the pin.
            guard = self._lanes.guard = _LaneGuard()
            weakref.finalize(guard, _drop_dead_thread_pin, weakref.ref(self), lane,
                             os.getpid())
        return lane

    def _cache(self, lane: _Lane) -> None:
        """Hand this thread's lane to the C fast paths."""
        self._cache_lane(-1 if lane.word is None else lane.word,
                         -1 if lane.pin is None else lane.pin, lane.pinned)

    def _claim_stripe(self) -> int | None:
        """This process's stripe, claiming a free one or one of a dead process; None (every
        path goes to ``pending``) when all 64 are in use."""
        me = IDENTITY.token
        owners = [owner & _U64 for owner in _OWNERS.unpack_from(self._buf, 0)]
        index = owners.index(me) if me in owners else None
        if index is None:
            index = next((i for i, owner in enumerate(owners)
                          if owner == 0 and self._take(i, 0, me)), None)
        if index is None:  # a sibling thread may have just claimed one for this process
            owners = [owner & _U64 for owner in _OWNERS.unpack_from(self._buf, 0)]
            index = owners.index(me) if me in owners else None
        if index is None:
            index = self._adopt_dead_stripe(owners, me)
        return index

    def _take(self, index: int, expected: int, me: int) -> bool:
        swapped, _ = self._atomics.cas(_STRIPE_AT[index] + _OWNER, _wrap(expected), _wrap(me))
        return bool(swapped)

    def _adopt_dead_stripe(self, owners: list[int], me: int) -> int | None:
        """Take over the stripe of a dead process: its count stays in the total.  Under
        the lock, tried without blocking, since clearing the dead pin count and a dead
        transient must not race a thaw or another adopter."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            for index, seen in enumerate(owners):
                # Re-read under the lock: only lock holders change a non-zero owner, so this
                # value stays put, while the snapshot may predate another adoption.
                line = _STRIPE_AT[index]
                owner = self._atomics.load(line + _OWNER) & _U64
                if owner and owner == seen and not token_alive(owner):
                    self._atomics.fetch_and(line + _PIN, _BLOCKED)  # count 0
                    word = self._atomics.load(line + _WORD)
                    if word & _FROZEN:  # a transient the dead owner never took back
                        record = self._atomics.load(line + _RECORD)
                        self._set_word(index, word, _wrap(record * 2 + 1))
                    if self._take(index, owner, me):
                        return index
            return None
        finally:
            self._lock.release()

    def _set_word(self, index: int, expected: int, new: int) -> bool:
        swapped, _ = self._atomics.cas(_STRIPE_AT[index] + _WORD, expected, new)
        return bool(swapped)

    # -- the operations (add and add_and_get are CounterCore's) -------------------------------

    def _add_slow(self, n: int) -> None:
        """add() where its C fast path does not apply: no lane cached for this thread, an n
        that is not small and positive, a central counter, or the ctypes fallback."""
        lane = self._lane()
        try:
            self._add_on(lane, n)
        finally:
            self._cache(lane)

    def _add_on(self, lane: _Lane, n: int) -> None:
        # Only positive adds use the stripe: threads of one process share it, and an
        # in-flight +n and -n on a frozen stripe would cancel out and look like no add in
        # flight at all to _unfreeze.  Subtractions go to pending, which is always exact.
        if type(n) is int and 0 < n < _SMALL:
            word = lane.word
            if word is not None and not self._atomics.load(_MODE):
                old = self._atomics.fetch_add(word, n + n)
                if (old + _RETIRE) & _SLOW_BITS:  # frozen, or this stripe is nearly full
                    self._add_landed(n, old)
            else:
                self._atomics.fetch_add(_PENDING, n)
                if word is not None:
                    lane.central_adds += 1
                    if lane.central_adds >= _THAW_AFTER:
                        lane.central_adds = 0
                        if lane.pinned:
                            self._unpin(lane)
                        self._try_thaw()
        else:
            self._atomics.fetch_add(_PENDING, _int64(n, "n"))

    def _add_landed(self, n: int, old: int) -> None:
        """The add landed on a frozen stripe (move it to pending, then take it back from
        the stripe), or the stripe's count grew large (retire the stripe)."""
        lane = self._lane()
        if old & _FROZEN:
            self._atomics.fetch_add(_PENDING, n)
            self._atomics.fetch_add(lane.word, -(n << 1))
        else:  # counted; but this stripe is full, so this thread goes to pending from now
            lane.word = None
            self._cache(lane)

    def _add_and_get_slow(self, n: int) -> int:
        return self._linearizable(_int64(n, "n"), None)

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Set the total to ``new`` if it is ``expected`` now, as one linearizable step;
        True if it was set.  Raises InvalidArgumentError for values outside int64."""
        return bool(self._linearizable(_int64(expected, "expected"), _int64(new, "new")))

    def _linearizable(self, a: int, b: int | None) -> int:
        lane = self._lane()
        try:
            if lane.pinned:
                # Pinned already: a thaw that sets BLOCKED finds our count and gives up, so a
                # read of our own pin word is enough.
                if not self._atomics.load(lane.pin) & _BLOCKED:
                    return self._apply(a, b)
                self._unpin(lane)
            elif lane.pin is not None:
                if not self._atomics.fetch_add(lane.pin, 1) & _BLOCKED:
                    lane.pinned = True
                    self._pinned.append(lane)
                    return self._apply(a, b)
                self._atomics.fetch_add(lane.pin, -1)
            with self._lock:
                # Pins are all blocked or all clear, except after a holder died inside
                # _unblock: then this thread's own pin may still be blocked.
                if self._atomics.load(lane.pin or _STRIPE_AT[0] + _PIN) & _BLOCKED:
                    self._go_central()
                return self._apply(a, b)
        finally:
            self._cache(lane)

    def _unpin(self, lane: _Lane) -> None:
        self._uncache_lane()  # first: the C fast path must never run on a pin being dropped
        lane.pinned = False
        self._atomics.fetch_add(lane.pin, -1)
        self._pinned.remove(lane)

    def _apply(self, a: int, b: int | None) -> int:
        """add_and_get(a) (``b`` None) or compare_and_set(a, b), on a central counter."""
        base: int = self._atomics.load(_FROZEN_SUM)
        if b is None:
            return _wrap(self._atomics.fetch_add(_PENDING, a) + a + base)
        swapped, _ = self._atomics.cas(_PENDING, _wrap(a - base), _wrap(b - base))
        return int(swapped)

    @property
    def value(self) -> int:
        """The total now: exact when no add is running, and never torn.

        Raises ObjectClosedError once closed.
        """
        if not self._open:
            raise ObjectClosedError(f"{self._what} is closed", obj=self._what)
        pending, *words = _WORDS.unpack_from(self._buf, 0)
        records = _RECORDS.unpack_from(self._buf, 0)
        # A frozen stripe counts through its record: a transient in it is already in
        # pending or not yet finished.
        return _wrap(pending + sum(record if word & _FROZEN else word >> 1
                                   for word, record in zip(words, records, strict=True)))

    # -- the two transitions, under the lock ------------------------------------------------

    def _go_central(self) -> None:
        # The hint first: adders then go to pending, and each thread has at most one add
        # left in flight on its stripe, so the compare-and-swaps below get through.
        self._atomics.store(_MODE, _CENTRAL)
        total = 0
        for index in range(STRIPES):
            total += self._freeze(index)
        self._atomics.store(_FROZEN_SUM, _wrap(total))
        self._unblock()

    def _freeze(self, index: int) -> int:
        """Freeze one stripe and return its count.  The record is written before the
        compare-and-swap that freezes, so a frozen stripe's record is always exact."""
        line = _STRIPE_AT[index]
        attempt = 0
        while True:
            word: int = self._atomics.load(line + _WORD)
            if word & _FROZEN:
                return int(self._atomics.load(line + _RECORD))
            self._atomics.store(line + _RECORD, word >> 1)
            if self._set_word(index, word, word | _FROZEN):
                return word >> 1
            attempt += 1
            if attempt % 100 == 0:  # an adder that had not seen the hint yet: let it finish
                os.sched_yield()

    def _unblock(self) -> None:
        for line in _STRIPE_AT:
            self._atomics.fetch_and(line + _PIN, ~_BLOCKED)
        self._atomics.store(_MODE, _CENTRAL)

    def _try_thaw(self) -> None:
        """Go back to stripes if the lock is free; never waits for it."""
        if self._lock.acquire(blocking=False):
            try:
                self._thaw()
            finally:
                self._lock.release()

    def _thaw(self) -> None:
        """Back to stripes, unless a live thread holds a pin (it may be mid-operation, and
        a process doing add_and_get is better served central anyway)."""
        self._atomics.store(_MODE, _STRIPED)
        for line in _STRIPE_AT:
            self._atomics.fetch_or(line + _PIN, _BLOCKED)
        for index, line in enumerate(_STRIPE_AT):
            if self._atomics.load(line + _PIN) & _COUNT_MASK and self._owner_alive(index):
                self._unblock()  # every stripe is still frozen: central stays valid
                return
            # else a dead process's pin: ignored here, cleared by its stripe's adopter
        for index in range(STRIPES):
            self._unfreeze(index)

    def _owner_alive(self, index: int) -> bool:
        owner = self._atomics.load(_STRIPE_AT[index] + _OWNER) & _U64
        return owner != 0 and token_alive(owner)

    def _unfreeze(self, index: int) -> None:
        """Unfreeze one stripe once it holds no transient; a transient of a dead owner is
        dropped (that add never finished), one of a live owner is waited out."""
        line = _STRIPE_AT[index]
        stable = _wrap(self._atomics.load(line + _RECORD) * 2)
        for attempt in range(_UNFREEZE_TRIES):
            word = self._atomics.load(line + _WORD)
            if not word & _FROZEN:
                return
            if self._set_word(index, stable | _FROZEN, stable):
                return
            if attempt == 0 and not self._owner_alive(index):
                self._set_word(index, word, stable)  # a dead owner's transient: never added
            elif attempt % 10 == 9:
                os.sched_yield()
        # A live owner that stopped mid-move (SIGSTOP, or an exception between its two
        # steps): the stripe stays frozen, a legal state (its adds go to pending), and a
        # later thaw retries.

    # -- life cycle -------------------------------------------------------------------------

    def __repr__(self) -> str:
        if not self._open:
            return f"<{self._what} closed>"
        return f"<{self._what} value={self.value}>"

    def close(self) -> None:
        """Drop this process's handles; the counter lives on in other processes (or by
        name).  Other threads must not use it any more.  Closing twice is harmless."""
        if not self._open:
            return
        for lane in list(self._pinned):  # this process's pins would block every thaw
            self._unpin(lane)
        self._finalizer.detach()
        self._open = False
        self._lanes = _Closed(self._what)
        _LIVE.discard(self)
        self._let_go()

    def unlink(self) -> None:
        """Remove a named counter system-wide.  Raises ObjectNotFoundError if it is gone."""
        self._shm.unlink()
