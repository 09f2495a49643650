"""Barrier: all parties pass together, rounds reuse it, timeouts break it."""

from __future__ import annotations

import os
import signal
import time

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


# -- reset and abort while parties wait ----------------------------------------------------

# The system calls a waiter sleeps in, by machine: a POSIX semaphore wait is a futex wait on
# the semaphore's word; a SysV one is semtimedop (glibc's semop is semtimedop too) on its id.
_SYSCALLS = {"x86_64": {"futex": 202, "semtimedop": 220},
             "aarch64": {"futex": 98, "semtimedop": 192}}


def _parked_on(pid: int, gate: ipcfork.Semaphore) -> bool:
    """True if process ``pid`` sleeps (state S) in the kernel waiting on ``gate``: in
    semtimedop on its id (sysv), or in a futex wait on a word of its mapping (posix)."""
    with open(f"/proc/{pid}/stat") as stat:
        state = stat.read().rpartition(")")[2].split()[0]
    with open(f"/proc/{pid}/syscall") as syscall:
        fields = syscall.read().split()
    if state != "S" or len(fields) < 2 or fields[0] in ("running", "-1"):
        return False
    numbers = _SYSCALLS[os.uname().machine]
    impl = gate._impl
    if gate.backend == "sysv":
        return int(fields[0]) == numbers["semtimedop"] and int(fields[1], 16) == impl.semid
    if int(fields[0]) != numbers["futex"]:
        return False
    # The futex word must lie in a mapping of the gate's file (same device and inode as our
    # own mapping of it: glibc maps a temporary name, so paths do not compare).
    return _mapped_file(pid, int(fields[1], 16)) == _mapped_file(os.getpid(), impl.handle)


def _mapped_file(pid: int, address: int) -> tuple[str, str] | None:
    """(device, inode) of the file mapped at ``address`` in process ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            span, _, _, device, inode = line.split()[:5]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return device, inode
    return None


def _wait_parked(pids: list[int], gate: ipcfork.Semaphore, limit: float = 30.0) -> None:
    """Return once every process in ``pids`` sleeps on ``gate``; fail after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not all(_parked_on(pid, gate) for pid in pids):
        assert time.monotonic() < deadline, f"{pids} did not all wait on the gate in {limit} s"
        os.sched_yield()


def _expect_broken(barrier: Barrier, timeout: float | None) -> int:
    """A party's body: 0 if wait() raises BrokenBarrierError, 1 if it passes."""
    try:
        barrier.wait(timeout=timeout)
    except ipcfork.BrokenBarrierError:
        return 0
    return 1


def test_reset_breaks_waiting_parties(backend: str) -> None:
    """reset() while two parties wait (one with a timeout, one without; both proved asleep
    on the gate by /proc) makes both raise BrokenBarrierError at once, as threading.Barrier
    does; abort() afterwards returns; after a further reset the barrier works again."""
    barrier = Barrier(3, backend=backend)
    waiters = [fork(_expect_broken, barrier, 30.0), fork(_expect_broken, barrier, None)]
    _wait_parked(waiters, barrier._gates[0])
    assert barrier.n_waiting == 2
    barrier.reset()
    assert [reap(pid, timeout=10) for pid in waiters] == [0, 0]
    assert not barrier.broken and barrier.n_waiting == 0
    aborter = fork(barrier.abort)
    assert reap(aborter, timeout=10) == 0
    assert barrier.broken
    barrier.reset()
    parties = [fork(lambda: barrier.wait(timeout=30) and 0) for _ in range(2)]
    barrier.wait(timeout=30)
    assert [reap(pid) for pid in parties] == [0, 0]
    barrier.close()


def test_abort_then_reset_before_woken_parties_run(backend: str) -> None:
    """abort() wakes the waiters; a reset() that comes before they have run (they are
    SIGSTOPped) must not take back their wake-ups: once continued they raise
    BrokenBarrierError, and the barrier then works for a full round."""
    barrier = Barrier(3, backend=backend)
    waiters = [fork(_expect_broken, barrier, None) for _ in range(2)]
    _wait_parked(waiters, barrier._gates[0])
    for pid in waiters:
        os.kill(pid, signal.SIGSTOP)
    barrier.abort()
    barrier.reset()
    for pid in waiters:
        os.kill(pid, signal.SIGCONT)
    assert [reap(pid, timeout=10) for pid in waiters] == [0, 0]
    parties = [fork(lambda: barrier.wait(timeout=30) and 0) for _ in range(2)]
    barrier.wait(timeout=30)
    assert [reap(pid) for pid in parties] == [0, 0]
    barrier.close()


def test_new_round_does_not_take_a_reset_partys_wake_up(backend: str) -> None:
    """A party woken by a reset but not yet run (SIGSTOPped) still has its wake-up on the
    gate; two resets later the round that uses that gate again must not pass on it: a
    lone wait(timeout) times out (not before its timeout) instead of passing alone, and
    the stopped party, continued, raises BrokenBarrierError."""
    barrier = Barrier(2, backend=backend)
    stopped = fork(_expect_broken, barrier, None)
    _wait_parked([stopped], barrier._gates[0])
    os.kill(stopped, signal.SIGSTOP)
    barrier.reset()  # wakes `stopped` through gate 0; the next round uses gate 1
    other = fork(_expect_broken, barrier, None)
    _wait_parked([other], barrier._gates[1])
    barrier.reset()  # wakes `other`; the next round uses gate 0 again
    assert reap(other, timeout=10) == 0
    timeout = 0.5
    start = time.monotonic()
    with pytest.raises(ipcfork.BrokenBarrierError, match="timed out"):
        barrier.wait(timeout=timeout)
    assert time.monotonic() - start >= timeout * 0.9
    os.kill(stopped, signal.SIGCONT)
    assert reap(stopped, timeout=10) == 0
    barrier.reset()
    party = fork(lambda: barrier.wait(timeout=30) and 0)
    barrier.wait(timeout=30)
    assert reap(party) == 0
    barrier.close()
