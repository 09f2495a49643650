"""Barrier: all parties pass together, rounds reuse it, timeouts break it."""

from __future__ import annotations

import pytest
from conftest import fork, reap

import ipcfork
from ipcfork import Barrier, SharedMemory


def test_four_processes_three_rounds(backend: str) -> None:
    parties, rounds = 4, 3
    barrier = Barrier(parties, backend=backend)
    shm = SharedMemory(8 * parties, backend=backend)

    def party(slot: int) -> int:
        marks = shm.buf.cast("Q")
        for round_no in range(1, rounds + 1):
            marks[slot] = round_no
            barrier.wait(timeout=30)
            # Past the barrier, every party has reached this round.
            if min(marks[i] for i in range(parties)) < round_no:
                return 1
            barrier.wait(timeout=30)  # nobody starts the next round before all checked
        return 0

    pids = [fork(party, slot) for slot in range(parties)]
    assert [reap(pid) for pid in pids] == [0] * parties
    barrier.close()
    shm.close()


def test_arrival_indices_are_distinct(backend: str) -> None:
    barrier = Barrier(2, backend=backend)
    child = fork(lambda: barrier.wait(timeout=30) + 10)
    mine = barrier.wait(timeout=30)
    theirs = reap(child) - 10
    assert {mine, theirs} == {0, 1}
    barrier.close()


def test_timeout_breaks_the_barrier(backend: str) -> None:
    barrier = Barrier(2, backend=backend)
    with pytest.raises(ipcfork.BrokenBarrierError):
        barrier.wait(timeout=0.05)
    assert barrier.broken
    with pytest.raises(ipcfork.BrokenBarrierError):
        barrier.wait(timeout=5)
    barrier.reset()
    assert not barrier.broken
    child = fork(lambda: barrier.wait(timeout=30) and 0)
    barrier.wait(timeout=30)
    assert reap(child) == 0
    barrier.close()


def test_parties_checked(backend: str) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="parties"):
        Barrier(0, backend=backend)
    with pytest.raises(ipcfork.InvalidArgumentError, match="parties"):
        Barrier(10**6, backend=backend)


def test_named_barrier_mismatched_parties(backend: str, name: str) -> None:
    barrier = Barrier(3, name, backend=backend)
    with pytest.raises(ipcfork.InvalidArgumentError, match="3 parties"):
        Barrier(4, name, backend=backend)
    barrier.unlink()
    barrier.close()
