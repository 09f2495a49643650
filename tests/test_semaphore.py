"""Semaphore: counting, no undo, timeouts, signals, create-or-open, limits."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import fork, reap, signal_once_blocked, wait_until_blocked

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
    elapsed = time.monotonic() - start
    assert elapsed >= 0.1 * 0.9  # it waited: a False returned at once is not a timeout
    assert elapsed < 10
    assert not sem.acquire(timeout=0)
    assert sem.value == 0  # the timed-out waits took nothing
    sem.close()


def test_blocked_wait_is_woken_by_release(backend: str) -> None:
    sem = Semaphore(0, backend=backend)

    def consumer() -> int:
        return 0 if sem.acquire(timeout=30) else 1

    child = fork(consumer)
    wait_until_blocked(child)  # the release below wakes a waiter, not a late arrival
    sem.release()
    assert reap(child) == 0
    assert sem.value == 0  # the woken consumer took the unit
    sem.close()


def test_signal_during_timed_wait_continues_with_time_left(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    seen = []
    timeout = 2.0  # ample for the watcher to see the wait begin, even on a busy machine
    with signal_once_blocked(signal.SIGUSR1,
                             lambda signum, frame: seen.append((signum, time.monotonic()))):
        start = time.monotonic()
        assert not sem.acquire(timeout=timeout)
        end = time.monotonic()
    assert [signum for signum, _ in seen] == [signal.SIGUSR1]
    assert start < seen[0][1] < end  # the handler ran during the wait
    assert end - start >= timeout * 0.9  # the signal did not end the wait early
    assert sem.value == 0
    sem.close()


def test_keyboard_interrupt_ends_a_blocking_wait(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    with (signal_once_blocked(signal.SIGUSR1, signal.default_int_handler),
          pytest.raises(KeyboardInterrupt)):
        sem.acquire()
    sem.release()  # the interrupted wait took nothing and left the semaphore usable
    assert sem.value == 1 and sem.acquire(blocking=False)
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


def _sysv_semaphore_exists(semid: int) -> bool:
    with open("/proc/sysvipc/sem") as table:
        return any(line.split()[1] == str(semid) for line in list(table)[1:])


def test_anonymous_sysv_semaphore_removed_by_creator_close() -> None:
    sem = Semaphore(1, backend="sysv")
    semid = sem._impl.semid
    assert _sysv_semaphore_exists(semid)
    sem.close()
    assert not _sysv_semaphore_exists(semid)


def test_child_exit_does_not_remove_family_semaphore() -> None:
    sem = Semaphore(0, backend="sysv")

    def child() -> None:
        sem.release()
        sem.close()  # a child's close never removes the creator's object

    semid = sem._impl.semid
    assert reap(fork(child)) == 0
    assert _sysv_semaphore_exists(semid)
    assert sem.acquire(timeout=5)
    sem.close()
    assert not _sysv_semaphore_exists(semid)  # the creator's close did remove it


def test_try_acquire_is_thread_safe(backend: str) -> None:
    """Threads of one process share a semaphore: tries (``blocking=False``) running while
    another thread blocks in ``acquire()`` never block, and the blocking acquire never
    fails because of them.  (SysV: a try used to flip the shared sysv_ipc object's
    ``block`` attribute, so another thread's blocking acquire could raise BusyError, or a
    try could block.)  Switches between threads are made very frequent to find such races.
    """
    import sys
    import threading

    sem = Semaphore(0, backend=backend)
    rounds, triers = 300, 3
    failures: list[BaseException] = []
    acked = threading.Semaphore(0)
    stop = threading.Event()

    def blocker() -> None:
        try:
            for _ in range(rounds):
                sem.acquire()
                acked.release()
        except BaseException as exc:
            failures.append(exc)
            acked.release()

    def trier() -> None:
        try:
            while not stop.is_set():
                if sem.acquire(blocking=False):
                    sem.release()  # not ours to keep: give the round's unit back
        except BaseException as exc:
            failures.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=trier) for _ in range(triers)]
    threads.append(threading.Thread(target=blocker))
    try:
        for thread in threads:
            thread.start()
        for done in range(rounds):
            sem.release()
            assert acked.acquire(timeout=30), f"blocking acquire {done} never returned"
            if failures:
                break
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for thread in threads:
            thread.join(timeout=10)
        stuck = [thread for thread in threads if thread.is_alive()]
        if stuck:
            sem.release(len(stuck))  # free tries that blocked, so the threads end
            for thread in stuck:
                thread.join(timeout=10)
        value = sem.value
        sem.close()
    assert not failures, f"a thread failed: {failures[0]!r}"
    assert not stuck, f"{len(stuck)} non-blocking tries blocked"
    assert value == 0


def test_sysv_set_never_initialised_is_refused_after_a_bounded_wait(keyfile: str) -> None:
    """A set whose creator never made its first semop (sem_otime still 0: the creator died
    between semget and semop) is refused after ipcfork's initialisation wait, with an error
    naming the object and the limit, instead of being used silently half-made."""
    import sysv_ipc

    from ipcfork._os import sysv as _sysv

    key = sysv_ipc.ftok(keyfile, ord("i"), silence_warning=True)
    raw = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, mode=0o600)  # semget only: no stamp
    try:
        assert raw.o_time == 0
        start = time.monotonic()
        with pytest.raises(ipcfork.ObjectCorruptError) as refused:
            Semaphore(name=keyfile, backend="sysv", create=False)
        elapsed = time.monotonic() - start
        assert elapsed >= _sysv._INIT_WAIT * 0.9
        assert elapsed < _sysv._INIT_WAIT + 20
        message = str(refused.value)
        assert keyfile in message and "(sysv)" in message
        assert f"{_sysv._INIT_WAIT} s" in message and str(raw.id) in message
        assert refused.value.limit is not None and refused.value.backend == "sysv"
        # The create-or-open path waits the same way, and then refuses the same way.
        with pytest.raises(ipcfork.ObjectCorruptError):
            Semaphore(name=keyfile, backend="sysv")
    finally:
        raw.remove()
