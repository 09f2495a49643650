"""A reusable barrier for processes, built from a robust Mutex, two Semaphores and a word of
shared memory per counter.

Two gates alternate by generation: a fast process that passes round *g* and arrives at round
*g+1* waits on the other gate, so it can never take a wake-up meant for a slow process still
leaving round *g*.

``reset()`` and ``abort()`` end a round with waiters as *broken*: they wake its waiters
through its gate, mark the gate's generation broken (so the woken raise BrokenBarrierError,
as with ``threading.Barrier``) and move on to the next generation.  Until the woken parties
have taken their wake-ups (the gate's *pending* count), no later round parks on that gate.
"""

from __future__ import annotations

import os
import time

from ._common import ClosingContext, check_count, describe
from ._os.names import DEFAULT_PROJ, _proj_id
from ._os.timeouts import Deadline, check_timeout
from .errors import BrokenBarrierError, InvalidArgumentError
from .mutex import Mutex
from .semaphore import Semaphore
from .shm import SharedMemory

__all__ = ["Barrier"]

# The shared words: arrivals this round, the round (generation), the broken flag, the number
# of parties; then per gate (by the parity of the generation): the last generation that
# ended broken on it (+1), and how many of its wake-ups its woken parties have not taken.
_COUNT, _GEN, _BROKEN, _PARTIES = range(4)
_BROKE = 4  # and 5
_PENDING = 6  # and 7
_WORDS = 8
MAX_PARTIES = 32767  # a SysV semaphore cannot count further (SEMVMX)
_DRAIN_PAUSE, _DRAIN_PAUSE_MAX = 0.0005, 0.005  # seconds; see Barrier.wait


class Barrier(ClosingContext):
    """``parties`` processes wait until all have arrived, then all go on; reusable.

    ``name`` works as for :class:`Semaphore`; a named barrier is made of several objects
    (POSIX: ``name``, ``name.lock``, ``name.gate0``, ``name.gate1``; SysV: keys
    ``ftok(path, proj)`` to ``ftok(path, proj + 3)``).

    Raises InvalidArgumentError for ``parties`` outside 1..32767 or when an existing named
    barrier was made for another number of parties.
    """

    def __init__(
        self,
        parties: int,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = DEFAULT_PROJ,
    ) -> None:
        self.parties = check_count(parties, "Barrier parties", low=1, high=MAX_PARTIES)
        self._what = describe("Barrier", name, backend)
        base = _proj_id(proj)
        if name is not None and backend == "sysv" and base + 3 > 255:
            raise InvalidArgumentError("a SysV Barrier needs proj <= 252", limit="proj + 3 <= 255")
        opts = {"backend": backend, "create": create, "exclusive": exclusive,
                "allow_foreign": allow_foreign}

        def part(suffix: str, offset: int) -> dict[str, object]:
            if name is None:
                return {"name": None}
            if backend == "posix":
                return {"name": f"{os.fspath(name)}{suffix}"}
            return {"name": name, "proj": base + offset}

        self._shm = SharedMemory(8 * _WORDS, **part("", 0), **opts)  # type: ignore[arg-type]
        if self._shm.size < 8 * _WORDS:
            size = self._shm.size
            self._shm.close()
            raise InvalidArgumentError(
                f"{self._what}: its state segment has {size} bytes, not {8 * _WORDS} (made "
                "by an older ipcfork?)", obj=self._what, backend=backend,
                limit=f"size >= {8 * _WORDS}")
        self._state = self._shm.buf.cast("Q")
        self._lock = Mutex(**part(".lock", 1), **opts)  # type: ignore[arg-type]
        self._gates = (
            Semaphore(0, **part(".gate0", 2), **opts),  # type: ignore[arg-type]
            Semaphore(0, **part(".gate1", 3), **opts),  # type: ignore[arg-type]
        )
        with self._lock:
            recorded = int(self._state[_PARTIES])
            if recorded == 0:
                self._state[_PARTIES] = self.parties
        if recorded not in (0, self.parties):
            self.close()
            raise InvalidArgumentError(
                f"{self._what} was made for {recorded} parties, not {parties}",
                obj=self._what, limit=f"parties == {recorded}")

    def __repr__(self) -> str:
        st = self._state
        return (f"<Barrier {self._what} parties={self.parties} waiting={st[_COUNT]}"
                f"{' broken' if st[_BROKEN] else ''}>")

    @property
    def n_waiting(self) -> int:
        """How many parties are waiting now (a snapshot)."""
        return int(self._state[_COUNT])

    @property
    def broken(self) -> bool:
        """True once a party timed out or called :meth:`abort` (until :meth:`reset`)."""
        return bool(self._state[_BROKEN])

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all parties; return this party's arrival index (0 .. parties-1).

        Raises BrokenBarrierError if the barrier is or becomes broken (:meth:`abort`, or a
        party dying while it held the barrier's lock), if :meth:`reset` is called while this
        party waits, and when ``timeout`` seconds pass first (which breaks it for every
        party, as in threading).
        """
        deadline = Deadline(check_timeout(timeout))
        st = self._state
        pause = _DRAIN_PAUSE
        while True:
            arrival = self._arrive(deadline)
            if arrival is not None:
                break
            # Parties woken by a reset or abort of an earlier round have not all taken their
            # wake-ups from the gate this round would use; parking there now could take
            # one.  Rare (two resets while a woken party has not run yet): poll.
            remaining = deadline.remaining()
            if remaining == 0.0:
                self.abort()
                raise self._broken_error(f"timed out after {timeout} s")
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(2 * pause, _DRAIN_PAUSE_MAX)
        generation, index, passed = arrival
        if passed:
            return index
        parity = generation % 2
        gate = self._gates[parity]
        if gate.acquire(timeout=deadline.remaining()):
            self._check_passed(generation)
            return index
        with self._lock:
            if st[_GEN] == generation:  # still open: our timeout breaks it for everyone
                st[_COUNT] -= 1
                self._break_locked()
                raise self._broken_error(f"timed out after {timeout} s")
        # The round ended (passed or broken) just as we timed out: our wake-up is on the gate.
        gate.acquire()
        self._check_passed(generation)
        return index

    def _arrive(self, deadline: Deadline) -> tuple[int, int, bool] | None:
        """Under the lock: count this party in; ``(generation, index, passed)``, or None
        while the gate this round uses still holds wake-ups of a broken round."""
        st = self._state
        if not self._lock.acquire(timeout=deadline.remaining()):
            self.abort()
            raise self._broken_error("timed out waiting for the barrier's lock")
        try:
            if self._lock.previous_owner_died:
                self._break_locked()  # a party died mid-update: nobody may pass this round
            if st[_BROKEN]:
                raise self._broken_error("the barrier is broken")
            generation = int(st[_GEN])
            if st[_PENDING + generation % 2]:
                return None
            index = int(st[_COUNT])
            if index + 1 < self.parties:
                st[_COUNT] = index + 1
                return generation, index, False
            st[_COUNT] = 0
            st[_GEN] = generation + 1
            if self.parties > 1:
                self._gates[generation % 2].release(self.parties - 1)
            return generation, index, True
        finally:
            self._lock.release()

    def _check_passed(self, generation: int) -> None:
        """After taking a wake-up of ``generation``: return if the round passed; raise
        BrokenBarrierError if a reset or abort ended it (its wake-up now taken)."""
        st = self._state
        parity = generation % 2
        if st[_BROKE + parity] != generation + 1:
            return
        with self._lock:
            st[_PENDING + parity] -= 1
        raise self._broken_error("the barrier was reset or broken while waiting")

    def _break_locked(self) -> None:
        """End the current round as broken (its waiters raise) and mark the barrier broken."""
        self._end_round_broken()
        self._state[_BROKEN] = 1

    def _end_round_broken(self) -> None:
        st = self._state
        waiting = int(st[_COUNT])
        if not waiting:
            return
        # Wake those parked on this generation's gate; they find the round marked broken.
        # The next round uses the other gate, so it cannot take these wake-ups.
        generation = int(st[_GEN])
        parity = generation % 2
        st[_BROKE + parity] = generation + 1
        st[_PENDING + parity] += waiting
        st[_COUNT] = 0
        st[_GEN] = generation + 1
        self._gates[parity].release(waiting)

    def abort(self) -> None:
        """Break the barrier: current and future waiters raise BrokenBarrierError (until
        :meth:`reset`)."""
        with self._lock:
            self._break_locked()

    def reset(self) -> None:
        """Return the barrier to its initial, unbroken state, as ``threading.Barrier`` does:
        parties waiting now raise BrokenBarrierError; later calls to :meth:`wait` start a
        new round."""
        with self._lock:
            self._end_round_broken()
            self._state[_BROKEN] = 0

    def _broken_error(self, why: str) -> BrokenBarrierError:
        return BrokenBarrierError(f"{self._what}: {why}", obj=self._what)

    def close(self) -> None:
        """Drop this process's handles."""
        self._state.release()
        self._shm.close()
        self._lock.close()
        for gate in self._gates:
            gate.close()

    def unlink(self) -> None:
        """Remove a named barrier's objects system-wide."""
        self._shm.unlink()
        self._lock.unlink()
        for gate in self._gates:
            gate.unlink()
