"""Semaphore: counting, no undo, timeouts, signals, create-or-open, limits."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Pipe, fork, reap

import ipcfork
from ipcfork import Semaphore


def test_counts_down_and_up(backend: str) -> None:
    sem = Semaphore(2, backend=backend)
    assert sem.value == 2
    assert sem.acquire() and sem.acquire()
    assert not sem.acquire(blocking=False)
    sem.release(2)
    assert sem.value == 2
    with sem:
        assert sem.value == 1
    assert sem.value == 2
    sem.close()


def test_producer_exit_keeps_its_releases(backend: str) -> None:
    """No SEM_UNDO: items a producer posted stay after it exits."""
    items = Semaphore(0, backend=backend)

    def producer() -> None:
        for _ in range(5):
            items.release()

    assert reap(fork(producer)) == 0
    assert items.value == 5
    assert all(items.acquire(blocking=False) for _ in range(5))
    assert not items.acquire(blocking=False)
    items.close()


def test_timeout_returns_false_promptly(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    start = time.monotonic()
    assert not sem.acquire(timeout=0.1)
    assert time.monotonic() - start < 10
    assert not sem.acquire(timeout=0)
    sem.close()


def test_blocked_wait_is_woken_by_release(backend: str, pipe: Pipe) -> None:
    sem = Semaphore(0, backend=backend)

    def consumer() -> int:
        pipe.send()
        return 0 if sem.acquire(timeout=30) else 1

    child = fork(consumer)
    pipe.recv()
    sem.release()
    assert reap(child) == 0
    sem.close()


def test_signal_during_timed_wait_continues_with_time_left(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    seen = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        assert not sem.acquire(timeout=0.5)
        assert time.monotonic() - start >= 0.45  # the signal did not end the wait early
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert seen == [signal.SIGALRM]
    sem.close()


def test_keyboard_interrupt_ends_a_blocking_wait(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            sem.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    sem.close()


def test_named_create_or_open_never_resets(backend: str, name: str) -> None:
    first = Semaphore(3, name, backend=backend)
    assert first.acquire()
    second = Semaphore(7, name, backend=backend)  # opens; value untouched
    assert second.value == 2
    with pytest.raises(ipcfork.ObjectExistsError):
        Semaphore(1, name, backend=backend, exclusive=True)
    second.close()
    first.unlink()
    first.close()
    with pytest.raises(ipcfork.ObjectNotFoundError):
        Semaphore(1, name, backend=backend, create=False)


def test_sysv_value_limit_is_named() -> None:
    sem = Semaphore(32767, backend="sysv")
    with pytest.raises(ipcfork.LimitExceededError, match="32767"):
        sem.release()
    sem.close()
    with pytest.raises(ipcfork.InvalidArgumentError, match=r"0\.\.32767"):
        Semaphore(40000, backend="sysv")


def test_bad_arguments(backend: str) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError):
        Semaphore(-1, backend=backend)
    with pytest.raises(ipcfork.InvalidArgumentError):
        Semaphore(1.5, backend=backend)  # type: ignore[arg-type]
    sem = Semaphore(1, backend=backend)
    with pytest.raises(ipcfork.InvalidArgumentError):
        sem.release(0)
    with pytest.raises(ipcfork.InvalidArgumentError):
        sem.acquire(timeout=float("nan"))
    sem.close()
    with pytest.raises(ipcfork.InvalidArgumentError, match="backend"):
        Semaphore(1, backend="dbus")


def test_anonymous_sysv_semaphore_removed_by_creator_close() -> None:
    sem = Semaphore(1, backend="sysv")
    semid = sem._impl.semid
    with open("/proc/sysvipc/sem") as table:
        assert any(line.split()[1] == str(semid) for line in table)
    sem.close()
    with open("/proc/sysvipc/sem") as table:
        assert not any(line.split()[1] == str(semid) for line in list(table)[1:])


def test_child_exit_does_not_remove_family_semaphore() -> None:
    sem = Semaphore(0, backend="sysv")

    def child() -> None:
        sem.release()
        sem.close()  # a child's close never removes the creator's object

    assert reap(fork(child)) == 0
    assert sem.acquire(timeout=5)
    sem.close()
    assert os.getpid()
