"""Mutex: exclusion, ownership, robustness after SIGKILL, timeouts, signals."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import (
    Pipe,
    fork,
    interrupt_repeatedly,
    reap,
    signal_once_blocked,
    wait_until_blocked,
)

import ipcfork
from ipcfork import Mutex, NotOwnerError, SharedMemory
from ipcfork._os import native as _native


def _hammer(mutex: Mutex, shm: SharedMemory, rounds: int) -> None:
    counter = shm.buf.cast("Q")
    for _ in range(rounds):
        with mutex:
            value = counter[0]
            os.sched_yield()  # widen the read-modify-write window
            counter[0] = value + 1


def test_mutual_exclusion_four_processes(backend: str) -> None:
    mutex = Mutex(backend=backend)
    shm = SharedMemory(8, backend=backend)
    rounds = 2000
    pids = [fork(_hammer, mutex, shm, rounds) for _ in range(4)]
    assert [reap(pid) for pid in pids] == [0, 0, 0, 0]
    counter = shm.buf.cast("Q")
    assert counter[0] == 4 * rounds
    assert not mutex.locked() and mutex.owner is None  # every worker gave it back
    counter.release()
    shm.close()
    mutex.close()


def test_owner_and_locked(backend: str) -> None:
    mutex = Mutex(backend=backend)
    assert mutex.owner is None and not mutex.locked()
    assert mutex.acquire()
    assert mutex.owner == os.getpid() and mutex.locked()
    assert not mutex.previous_owner_died and mutex.dead_owner_pid is None
    mutex.release()
    assert mutex.owner is None and not mutex.locked()
    mutex.close()


def test_release_by_non_owner_is_refused(backend: str) -> None:
    mutex = Mutex(backend=backend)
    with pytest.raises(NotOwnerError, match="held by nobody"):
        mutex.release()
    mutex.acquire()

    def child() -> int:
        try:
            mutex.release()  # the child inherited the handle, not the ownership
        except NotOwnerError as exc:
            return 0 if str(os.getppid()) in str(exc) else 2
        return 1

    assert reap(fork(child)) == 0
    assert mutex.owner == os.getpid()
    mutex.release()
    assert not mutex.locked()
    mutex.close()


def _hold_until_killed(mutex: Mutex, ready: Pipe) -> None:
    mutex.acquire()
    ready.send()
    signal.pause()


def test_holder_sigkilled_next_acquire_succeeds(backend: str, pipe: Pipe) -> None:
    mutex = Mutex(backend=backend)
    holder = fork(_hold_until_killed, mutex, pipe)
    pipe.recv()
    assert mutex.owner == holder
    os.kill(holder, signal.SIGKILL)
    assert reap(holder) == -signal.SIGKILL
    assert mutex.acquire(timeout=30)
    assert mutex.previous_owner_died
    assert mutex.dead_owner_pid == holder
    assert mutex.owner == os.getpid()
    mutex.release()
    assert not mutex.previous_owner_died
    assert mutex.acquire(timeout=30) and not mutex.previous_owner_died
    mutex.release()
    assert not mutex.locked()
    mutex.close()


def test_blocked_waiter_wakes_when_holder_dies(backend: str, pipe: Pipe) -> None:
    mutex = Mutex(backend=backend)
    holder = fork(_hold_until_killed, mutex, pipe)
    pipe.recv()

    def waiter() -> int:
        if not mutex.acquire(timeout=30):
            return 3
        died, pid = mutex.previous_owner_died, mutex.dead_owner_pid
        mutex.release()
        return 0 if died and pid == holder else 4

    waiting = fork(waiter)
    wait_until_blocked(waiting)  # the waiter is asleep in the wait before the holder dies
    os.kill(holder, signal.SIGKILL)
    assert reap(holder) == -signal.SIGKILL
    assert reap(waiting) == 0
    assert not mutex.locked()  # the waiter released what it recovered
    mutex.close()


def test_acquire_timeout_returns_false(backend: str, pipe: Pipe) -> None:
    mutex = Mutex(backend=backend)
    holder = fork(_hold_until_killed, mutex, pipe)
    pipe.recv()
    assert not mutex.acquire(blocking=False)
    start = time.monotonic()
    assert not mutex.acquire(timeout=0.2)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.2 * 0.9  # it waited: a False returned at once is not a timeout
    assert elapsed < 10  # generous: it must return, not block forever
    assert not mutex.acquire(timeout=0)
    assert mutex.owner == holder  # the timed-out waits took nothing
    os.kill(holder, signal.SIGKILL)
    assert reap(holder) == -signal.SIGKILL
    assert mutex.acquire(timeout=30) and mutex.dead_owner_pid == holder
    mutex.release()
    assert not mutex.locked()
    mutex.close()


def test_signal_during_wait_runs_handler_and_keeps_waiting(backend: str, pipe: Pipe) -> None:
    mutex = Mutex(backend=backend)
    release_pipe = Pipe()

    def holder() -> None:
        mutex.acquire()
        pipe.send()
        release_pipe.recv()  # released only once the parent's signal handler has run
        mutex.release()

    child = fork(holder)
    pipe.recv()
    calls = []

    def on_signal(signum: int, frame: object) -> None:
        calls.append(signum)
        release_pipe.send()

    try:
        with signal_once_blocked(signal.SIGUSR1, on_signal):
            assert mutex.acquire()  # interrupted by SIGUSR1, then acquired after the release
        assert calls == [signal.SIGUSR1]
        mutex.release()
    finally:
        release_pipe.close()
    assert reap(child) == 0
    assert not mutex.locked()
    mutex.close()


def test_raising_signal_handler_interrupts_wait(backend: str, pipe: Pipe) -> None:
    mutex = Mutex(backend=backend)
    holder = fork(_hold_until_killed, mutex, pipe)
    pipe.recv()

    class Interrupted(Exception):
        pass

    def on_signal(signum: int, frame: object) -> None:
        raise Interrupted

    with signal_once_blocked(signal.SIGUSR1, on_signal), pytest.raises(Interrupted):
        mutex.acquire(timeout=30)
    assert mutex.owner == holder  # the interrupted wait took nothing
    os.kill(holder, signal.SIGKILL)
    assert reap(holder) == -signal.SIGKILL
    mutex.close()


def test_named_mutex_is_shared_and_unlinked(backend: str, name: str) -> None:
    first = Mutex(name, backend=backend)
    second = Mutex(name, backend=backend, create=False)
    assert first.acquire()
    assert not second.acquire(blocking=False)
    with pytest.raises(NotOwnerError):
        second.release()  # same process but another handle: ownership is per handle
    first.release()
    assert second.acquire(blocking=False)
    second.release()
    assert not first.locked()
    second.close()
    first.unlink()
    first.close()
    with pytest.raises(ipcfork.ObjectNotFoundError):
        Mutex(name, backend=backend, create=False)


def test_timeout_with_non_blocking_is_an_error(backend: str) -> None:
    mutex = Mutex(backend=backend)
    for bad in ({"timeout": -1}, {"timeout": float("nan")}, {"blocking": False, "timeout": 1}):
        with pytest.raises(ipcfork.InvalidArgumentError):  # checked even when the lock is free
            mutex.acquire(**bad)  # type: ignore[arg-type]
    assert not mutex.locked()
    mutex.acquire()
    with pytest.raises(ipcfork.InvalidArgumentError):
        mutex.acquire(blocking=False, timeout=1)
    with pytest.raises(ipcfork.InvalidArgumentError, match=">= 0"):
        mutex.acquire(timeout=-1)
    mutex.release()
    assert not mutex.locked()
    mutex.close()


def test_ctrl_c_in_a_tight_with_loop_never_leaks_the_lock(backend: str) -> None:
    """A handler that raises right after the lock is taken, or as a release begins, must
    not leave the mutex held (the compiled core's methods leave no bytecode boundary in
    which a Python handler could run)."""
    if _native.PATH != "compiled":
        pytest.skip("the ctypes fallback's Python methods can be interrupted at entry")
    mutex = Mutex(backend=backend)

    def with_block() -> None:
        with mutex:
            pass

    def check(interruption: int) -> None:
        # Neither held with no owner nor left held by us: the with statement must have
        # released it.
        assert not mutex.locked(), f"interrupt {interruption} left {mutex!r}"

    interrupt_repeatedly(with_block, check, interval=0.0003)
    assert not mutex.locked() and mutex.owner is None
    mutex.close()


def test_use_after_close_is_an_error_not_a_crash(backend: str) -> None:
    mutex = Mutex(backend=backend)
    mutex.close()
    for call in (lambda: mutex.acquire(timeout=0), lambda: mutex.acquire(timeout=0.01),
                 lambda: mutex.acquire(blocking=False)):
        with pytest.raises(ipcfork.ObjectClosedError):
            call()
