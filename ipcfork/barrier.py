"""A reusable barrier for processes, built from a robust Mutex, two Semaphores and a word of
shared memory per counter.

Two gates alternate by generation: a fast process that passes round *g* and arrives at round
*g+1* waits on the other gate, so it can never take a wake-up meant for a slow process still
leaving round *g*.
"""

from __future__ import annotations

import os
from types import TracebackType

from ._common import check_count, describe
from ._names import DEFAULT_PROJ, _proj_id
from ._timeouts import Deadline, check_timeout
from .errors import BrokenBarrierError, InvalidArgumentError
from .mutex import Mutex
from .semaphore import Semaphore
from .shm import SharedMemory

__all__ = ["Barrier"]

_COUNT, _GEN, _BROKEN, _PARTIES = range(4)
MAX_PARTIES = 32767  # a SysV semaphore cannot count further (SEMVMX)


class Barrier:
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

        self._shm = SharedMemory(8 * 4, **part("", 0), **opts)  # type: ignore[arg-type]
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

        Raises BrokenBarrierError if the barrier is or becomes broken, including when
        ``timeout`` seconds pass first (which breaks it for every party, as in threading).
        """
        deadline = Deadline(check_timeout(timeout))
        st = self._state
        if not self._lock.acquire(timeout=deadline.remaining()):
            self.abort()
            raise self._broken_error("timed out waiting for the barrier's lock")
        try:
            if st[_BROKEN] or self._lock.previous_owner_died:
                st[_BROKEN] = 1
                raise self._broken_error("the barrier is broken")
            generation = st[_GEN]
            index = st[_COUNT]
            if index + 1 == self.parties:
                st[_COUNT] = 0
                st[_GEN] = generation + 1
                if self.parties > 1:
                    self._gates[generation % 2].release(self.parties - 1)
                return int(index)
            st[_COUNT] = index + 1
        finally:
            self._lock.release()
        gate = self._gates[generation % 2]
        if gate.acquire(timeout=deadline.remaining()):
            if st[_GEN] == generation:  # woken by a break, not by the last arrival
                raise self._broken_error("the barrier was broken while waiting")
            return int(index)
        with self._lock:
            if st[_GEN] != generation:
                gate.acquire()  # the last party arrived just as we timed out: take our token
                return int(index)
            if st[_BROKEN]:
                gate.acquire()  # whoever broke it left a wake-up for us: take it
            else:
                self._break_locked()
        raise self._broken_error(f"timed out after {timeout} s")

    def _break_locked(self) -> None:
        st = self._state
        st[_BROKEN] = 1
        waiting = int(st[_COUNT])
        st[_COUNT] = 0
        if waiting:
            # Wake those still parked on this generation's gate; they see BROKEN and raise.
            self._gates[st[_GEN] % 2].release(waiting)

    def abort(self) -> None:
        """Break the barrier: current and future waiters raise BrokenBarrierError."""
        with self._lock:
            self._break_locked()

    def reset(self) -> None:
        """Return a broken barrier to its initial, unbroken state."""
        with self._lock:
            st = self._state
            for gate in self._gates:
                while gate.acquire(blocking=False):
                    pass
            st[_COUNT] = 0
            st[_BROKEN] = 0
            st[_GEN] = st[_GEN] + 1

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

    def __enter__(self) -> Barrier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
