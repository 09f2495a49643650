"""SharedCounter: a 64-bit counter for a fork family, lock-free to add to, linearizable to
read-and-update.

Layout (one segment): a header line (``pending``, a mode hint, ``frozen_sum``, a magic
word, a lock word) and 64 *stripes* of 128 bytes each, so that no two stripes share a cache
line or an adjacent-line prefetch pair (``word``, ``owner``, ``pin``, ``record``).  A
stripe word holds its count shifted left by one; bit 0 is FROZEN.

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
compare-and-swap that fails while a transient is in it) happen under the header's lock
word (:class:`~ipcfork._wordlock.WordLock`: taken by one compare-and-swap that writes the
holder's token, so a holder killed at any point is recognised and replaced).  A
linearizable operation *pins* its stripe once (one fetch-and-add that
also tells it, through the BLOCKED bit, whether the counter is central) and keeps the pin
until its thread next tries to go back to stripes.  Invariant: while any pin is unblocked,
every stripe is frozen and ``frozen_sum`` is right.  Every step is idempotent and ordered
so that a holder killed half-way leaves a state the next holder completes; a record is
written before the compare-and-swap that freezes its stripe, so a frozen stripe's record
is always exact.

Each thread in each process has a *lane* (its stripe's addresses and a pin flag); a forked
child starts without lanes and claims its own stripe on first use.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from ctypes import byref, c_int64, c_void_p
from types import TracebackType
from typing import Any

from ._atomic import SEQ_CST, atomics, word_address
from ._identity import IDENTITY, token_alive
from ._wordlock import WordLock
from .errors import InvalidArgumentError, ObjectClosedError, ObjectCorruptError
from .shm import SharedMemory

__all__ = ["SharedCounter"]

STRIPES = 64
_LINE = 128
SIZE = _LINE * (1 + STRIPES)
_PENDING, _MODE, _FROZEN_SUM, _MAGIC, _LOCK = 0, 8, 16, 24, 32
_WORD, _OWNER, _PIN, _RECORD = 0, 8, 16, 24
_MAGIC_VALUE = 0x33746E6366637069  # b"ipcfcnt3", little-endian
_STRIPED, _CENTRAL = 0, 1

_FROZEN = 1
_BLOCKED = 1 << 62
_COUNT_MASK = (1 << 32) - 1
_U64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ONE = 1
_SMALL = 1 << 31  # adds of |n| below this go to a stripe; larger ones straight to pending
_RETIRE = 1 << 61  # a stripe word past this is left for good: its count can never overflow
# (word + _RETIRE) & _SLOW_BITS is 0 exactly when the word is even (not FROZEN) and within
# [-_RETIRE, _RETIRE): one test instead of three on the hot path.
_SLOW_BITS = -(1 << 62) | _FROZEN
_THAW_AFTER = 4096  # central adds by one thread before it tries to go back to stripes
_UNFREEZE_TRIES = 100  # attempts to find a frozen stripe without a move in flight

_C_ONE, _C_MINUS_ONE, _C_TWO = c_int64(1), c_int64(-1), c_int64(2)
_C_BLOCKED, _C_UNBLOCKED = c_int64(_BLOCKED), c_int64(~_BLOCKED)
_LINE_PAD = f"{_LINE - 8}x"
_WORDS = struct.Struct("<" + f"q{_LINE_PAD}" * STRIPES + "q")  # pending, each stripe word
_RECORDS = struct.Struct("<" + f"{_RECORD}xq{_LINE - _RECORD - 8}x" * STRIPES)
_OWNERS = struct.Struct("<" + f"{_OWNER}xq{_LINE - _OWNER - 8}x" * STRIPES)


def _wrap(value: int) -> int:
    """``value`` reduced to a signed 64-bit integer, as the hardware adds."""
    return ((value - _INT64_MIN) & _U64) + _INT64_MIN


def _int64(value: object, what: str) -> int:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidArgumentError(
            f"{what} must be an int in -2**63..2**63-1, not {value!r}",
            limit="-2**63 <= n < 2**63")
    return value


class _Lane:
    """One thread's handles on its process's stripe (``word`` is None without one)."""

    __slots__ = ("central_adds", "pin", "pin_cell", "pinned", "word")

    def __init__(self, word: int | None, pin: int | None) -> None:
        self.word = None if word is None else c_void_p(word)
        self.pin = None if pin is None else c_void_p(pin)
        self.pin_cell = None if pin is None else c_int64.from_address(pin)
        self.pinned = False  # holds one count on its pin: linearizable ops need no RMW
        self.central_adds = 0


class _Closed:
    """Stands in for the lanes of a closed counter: every use raises."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, attribute: str) -> Any:
        raise ObjectClosedError(f"{self._what} is closed", obj=self._what)


_LIVE: weakref.WeakSet[SharedCounter] = weakref.WeakSet()


def _unpin_all(ops: Any, pinned: list[_Lane], _segment: SharedMemory, pid: int) -> None:
    """Finalizer: drop the pins of a counter that was never closed (in its own process
    only: a forked child's copy of the list holds the parent's pins)."""
    if os.getpid() == pid:
        for lane in pinned:
            ops.fetch_add(lane.pin, _C_MINUS_ONE, SEQ_CST)
        pinned.clear()


def _forget_lanes_after_fork() -> None:
    for counter in list(_LIVE):
        if counter._open:
            counter._lanes = threading.local()
            counter._pinned = []  # the parent's pins are the parent's
            counter._lock.after_fork_in_child()
            counter._finalizer.detach()
            counter._finalizer = weakref.finalize(counter, _unpin_all, counter._ops,
                                                  counter._pinned, counter._shm, os.getpid())


os.register_at_fork(after_in_child=_forget_lanes_after_fork)


class SharedCounter:
    """A signed 64-bit counter shared by processes (arithmetic wraps like a C ``int64_t``).

    ``add(n)`` never blocks and never loses an update; ``value`` reads the total (exact
    once adds have stopped; while they run, it counts every add that finished before the
    read began); ``add_and_get(n)`` and ``compare_and_set(expected, new)`` are
    linearizable.  Anonymous by default (share it with children through ``fork``) or named
    like :class:`SharedMemory` (one segment, nothing else).  ``initial`` is written only
    when the counter is created.

    Raises InvalidArgumentError for a value outside the int64 range, ObjectCorruptError
    when a named segment is not a SharedCounter, IpcforkError when libatomic is missing.
    """

    def __init__(self, initial: int = 0, name: str | os.PathLike[str] | None = None, *,
                 backend: str = "posix", create: bool = True, exclusive: bool = False,
                 allow_foreign: bool = False, proj: int | str = "i") -> None:
        _int64(initial, "initial")
        self._open = False
        self._lanes: Any = _Closed("SharedCounter (not yet open)")
        self._ops = atomics()
        self._fetch_add = self._ops.fetch_add
        self._shm = SharedMemory(SIZE, name, backend=backend, create=create,
                                 exclusive=exclusive, allow_foreign=allow_foreign, proj=proj)
        self._what = f"SharedCounter {os.fspath(name)!r} ({backend})" if name else \
            "SharedCounter"
        try:
            if self._shm.size < SIZE:
                raise ObjectCorruptError(f"{self._what} has {self._shm.size} bytes, a "
                                         f"SharedCounter needs {SIZE}", obj=self._what)
            self._buf = self._shm.buf
            base = word_address(self._buf, 0)
        except BaseException:
            self._shm.close()
            raise
        self._lock = WordLock(self._ops, base + _LOCK)
        self._pending = c_void_p(base + _PENDING)
        self._mode = c_int64.from_address(base + _MODE)
        self._frozen_sum = c_int64.from_address(base + _FROZEN_SUM)
        lines = [base + _LINE * (1 + i) for i in range(STRIPES)]
        self._words = [c_void_p(line + _WORD) for line in lines]
        self._word_cells = [c_int64.from_address(line + _WORD) for line in lines]
        self._records = [c_int64.from_address(line + _RECORD) for line in lines]
        self._pins = [c_void_p(line + _PIN) for line in lines]
        self._owners = [c_void_p(line + _OWNER) for line in lines]
        self.created = self._shm.created
        try:
            with self._lock:
                self._initialize(base, initial)
        except BaseException:
            del self._buf
            self._shm.close()
            raise
        self._lanes = threading.local()
        self._pinned: list[_Lane] = []
        # A counter dropped without close(): give back this process's pins, or every later
        # thaw would give up.  The finalizer holds the segment, so it is still mapped.
        self._finalizer = weakref.finalize(self, _unpin_all, self._ops, self._pinned,
                                           self._shm, os.getpid())
        self._open = True
        _LIVE.add(self)

    def _initialize(self, base: int, initial: int) -> None:
        magic = c_int64.from_address(base + _MAGIC)
        if magic.value == _MAGIC_VALUE:
            return
        if magic.value != 0:
            raise ObjectCorruptError(f"{self._what} is not a SharedCounter (bad magic)",
                                     obj=self._what)
        for pin in self._pins:  # striped: every pin blocked
            self._ops.fetch_or(pin, _C_BLOCKED, SEQ_CST)
        c_int64.from_address(base + _PENDING).value = initial
        magic.value = _MAGIC_VALUE

    # -- lanes and stripes ------------------------------------------------------------------

    def _lane(self) -> _Lane:
        try:
            lane: _Lane = self._lanes.lane
        except AttributeError:
            lane = self._lanes.lane = self._claim_lane()
        return lane

    def _claim_lane(self) -> _Lane:
        """A lane on this process's stripe, claiming a free one or one of a dead process;
        a lane without a stripe (every path goes to ``pending``) when all 64 are in use."""
        me = IDENTITY.token
        owners = [owner & _U64 for owner in _OWNERS.unpack_from(self._buf, _LINE)]
        index = owners.index(me) if me in owners else None
        if index is None:
            index = next((i for i, owner in enumerate(owners)
                          if owner == 0 and self._take(i, 0, me)), None)
        if index is None:  # a sibling thread may have just claimed one for this process
            owners = [owner & _U64 for owner in _OWNERS.unpack_from(self._buf, _LINE)]
            index = owners.index(me) if me in owners else None
        if index is None:
            index = self._adopt_dead_stripe(owners, me)
        if index is None:
            return _Lane(None, None)
        return _Lane(self._words[index].value, self._pins[index].value)

    def _take(self, index: int, expected: int, me: int) -> bool:
        was = c_int64(_wrap(expected))
        return bool(self._ops.cas(self._owners[index], byref(was), c_int64(_wrap(me)),
                                  SEQ_CST, SEQ_CST))

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
                owner = self._ops.load(self._owners[index], SEQ_CST) & _U64
                if owner and owner == seen and not token_alive(owner):
                    self._ops.fetch_and(self._pins[index], _C_BLOCKED, SEQ_CST)  # count 0
                    word = self._word_cells[index].value
                    if word & _FROZEN:  # a transient the dead owner never took back
                        self._set_word(index, word, self._records[index].value * 2 + 1)
                    if self._take(index, owner, me):
                        return index
            return None
        finally:
            self._lock.release()

    def _set_word(self, index: int, expected: int, new: int) -> bool:
        was = c_int64(expected)
        return bool(self._ops.cas(self._words[index], byref(was), c_int64(new),
                                  SEQ_CST, SEQ_CST))

    # -- the operations ---------------------------------------------------------------------

    def add(self, n: int = 1) -> None:
        """Add ``n`` (default 1).  Never blocks, never loses an update.

        Raises InvalidArgumentError if ``n`` is not an int in the int64 range.
        """
        try:
            lane: _Lane = self._lanes.lane
        except AttributeError:
            lane = self._lane()
        word = lane.word
        if n is _ONE and word is not None and not self._mode.value:
            # The common case in as few steps as possible.  ``is``: only the int 1 (CPython
            # keeps one), never True or 1.0.  Only FROZEN needs a look: adding one at a time,
            # a count would need 2**60 adds to reach the retirement threshold.
            if self._fetch_add(word, _C_TWO, SEQ_CST) & _FROZEN:
                self._add_slowly(lane, 1, _FROZEN)
            return
        self._add_any(lane, word, n)

    def _add_any(self, lane: _Lane, word: c_void_p | None, n: int) -> None:
        # Only positive adds use the stripe: threads of one process share it, and an
        # in-flight +n and -n on a frozen stripe would cancel out and look like no add in
        # flight at all to _unfreeze.  Subtractions go to pending, which is always exact.
        if type(n) is int and 0 < n < _SMALL:
            if word is not None and not self._mode.value:
                old = self._fetch_add(word, _C_TWO if n == 1 else c_int64(n + n), SEQ_CST)
                if (old + _RETIRE) & _SLOW_BITS:  # frozen, or this stripe is nearly full
                    self._add_slowly(lane, n, old)
                return
            self._fetch_add(self._pending, _C_ONE if n == 1 else c_int64(n), SEQ_CST)
            if word is not None:
                lane.central_adds += 1
                if lane.central_adds >= _THAW_AFTER:
                    lane.central_adds = 0
                    if lane.pinned:
                        self._unpin(lane)
                    self._try_thaw()
            return
        self._fetch_add(self._pending, c_int64(_int64(n, "n")), SEQ_CST)

    def _add_slowly(self, lane: _Lane, n: int, old: int) -> None:
        """The add landed on a frozen stripe (move it to pending, then take it back from
        the stripe), or the stripe's count grew large (retire the stripe)."""
        if old & _FROZEN:
            self._ops.fetch_add(self._pending, c_int64(n), SEQ_CST)
            self._ops.fetch_add(lane.word, c_int64(-(n << 1)), SEQ_CST)
        else:  # counted; but this stripe is full, so this thread goes to pending from now
            lane.word = None

    def add_and_get(self, n: int = 1) -> int:
        """Add ``n`` and return the new total, as one linearizable step.

        Raises InvalidArgumentError if ``n`` is not an int in the int64 range.
        """
        return self._linearizable(_int64(n, "n"), None)

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Set the total to ``new`` if it is ``expected`` now, as one linearizable step;
        True if it was set.  Raises InvalidArgumentError for values outside int64."""
        return bool(self._linearizable(_int64(expected, "expected"), _int64(new, "new")))

    def _linearizable(self, a: int, b: int | None) -> int:
        lane = self._lane()
        if lane.pinned:
            # Pinned already: a thaw that sets BLOCKED finds our count and gives up, so a
            # plain read of our own pin word is enough.
            if not lane.pin_cell.value & _BLOCKED:  # type: ignore[union-attr]
                return self._apply(a, b)
            self._unpin(lane)
        elif lane.pin is not None:
            if not self._ops.fetch_add(lane.pin, _C_ONE, SEQ_CST) & _BLOCKED:
                lane.pinned = True
                self._pinned.append(lane)
                return self._apply(a, b)
            self._ops.fetch_add(lane.pin, _C_MINUS_ONE, SEQ_CST)
        with self._lock:
            # Pins are all blocked or all clear, except after a holder died inside
            # _unblock: then this thread's own pin may still be blocked.
            if self._ops.load(lane.pin or self._pins[0], SEQ_CST) & _BLOCKED:
                self._go_central()
            return self._apply(a, b)

    def _unpin(self, lane: _Lane) -> None:
        lane.pinned = False
        self._ops.fetch_add(lane.pin, _C_MINUS_ONE, SEQ_CST)
        self._pinned.remove(lane)

    def _apply(self, a: int, b: int | None) -> int:
        """add_and_get(a) (``b`` None) or compare_and_set(a, b), on a central counter."""
        base = self._frozen_sum.value
        if b is None:
            return _wrap(self._ops.fetch_add(self._pending, c_int64(a), SEQ_CST) + a + base)
        was = c_int64(_wrap(a - base))
        return int(self._ops.cas(self._pending, byref(was), c_int64(_wrap(b - base)),
                                 SEQ_CST, SEQ_CST))

    @property
    def value(self) -> int:
        """The total now: exact when no add is running, and never torn.

        Raises ObjectClosedError once closed.
        """
        if not self._open:
            raise ObjectClosedError(f"{self._what} is closed", obj=self._what)
        pending, *words = _WORDS.unpack_from(self._buf, 0)
        records = _RECORDS.unpack_from(self._buf, _LINE)
        # A frozen stripe counts through its record: a transient in it is already in
        # pending or not yet finished.
        return _wrap(pending + sum(record if word & _FROZEN else word >> 1
                                   for word, record in zip(words, records, strict=True)))

    # -- the two transitions, under the lock ------------------------------------------------

    def _go_central(self) -> None:
        # The hint first: adders then go to pending, and each thread has at most one add
        # left in flight on its stripe, so the compare-and-swaps below get through.
        self._mode.value = _CENTRAL
        total = 0
        for index in range(STRIPES):
            total += self._freeze(index)
        self._frozen_sum.value = _wrap(total)
        self._unblock()

    def _freeze(self, index: int) -> int:
        """Freeze one stripe and return its count.  The record is written before the
        compare-and-swap that freezes, so a frozen stripe's record is always exact."""
        cell, record = self._word_cells[index], self._records[index]
        attempt = 0
        while True:
            word = cell.value
            if word & _FROZEN:
                return int(record.value)
            record.value = word >> 1
            if self._set_word(index, word, word | _FROZEN):
                return word >> 1
            attempt += 1
            if attempt % 100 == 0:  # an adder that had not seen the hint yet: let it finish
                os.sched_yield()

    def _unblock(self) -> None:
        for pin in self._pins:
            self._ops.fetch_and(pin, _C_UNBLOCKED, SEQ_CST)
        self._mode.value = _CENTRAL

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
        self._mode.value = _STRIPED
        for pin in self._pins:
            self._ops.fetch_or(pin, _C_BLOCKED, SEQ_CST)
        for index, pin in enumerate(self._pins):
            if self._ops.load(pin, SEQ_CST) & _COUNT_MASK and self._owner_alive(index):
                self._unblock()  # every stripe is still frozen: central stays valid
                return
            # else a dead process's pin: ignored here, cleared by its stripe's adopter
        for index in range(STRIPES):
            self._unfreeze(index)

    def _owner_alive(self, index: int) -> bool:
        owner = self._ops.load(self._owners[index], SEQ_CST) & _U64
        return owner != 0 and token_alive(owner)

    def _unfreeze(self, index: int) -> None:
        """Unfreeze one stripe once it holds no transient; a transient of a dead owner is
        dropped (that add never finished), one of a live owner is waited out."""
        cell, stable = self._word_cells[index], self._records[index].value * 2
        for attempt in range(_UNFREEZE_TRIES):
            word = cell.value
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
        del self._buf
        self._shm.close()

    def unlink(self) -> None:
        """Remove a named counter system-wide.  Raises ObjectNotFoundError if it is gone."""
        self._shm.unlink()

    def __enter__(self) -> SharedCounter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
