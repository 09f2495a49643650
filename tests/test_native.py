"""The native core on both of its paths: the compiled extension and the ctypes fallback.

Every test that takes the ``core`` fixture runs once per path available here; the two paths
share one mutex block across processes; robustness is shown by random SIGKILLs.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

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
from ipcfork._os import native as _native
from ipcfork._os.native import fallback

try:
    from ipcfork._os.native import _core as compiled  # type: ignore[attr-defined]
except ImportError:  # installed without a compiler: only the fallback is tested here
    compiled = None

PATHS = {"compiled": compiled, "ctypes": fallback}


def _path(name: str) -> ModuleType:
    module = PATHS[name]
    if module is None:
        pytest.skip("the C extension is not built here")
    return module


@pytest.fixture(params=sorted(PATHS))
def core(request: pytest.FixtureRequest) -> ModuleType:
    return _path(str(request.param))


@pytest.fixture
def block() -> Iterator[memoryview]:
    """A zeroed page of POSIX shared memory (futex waits on it count as IPC waits)."""
    with ipcfork.SharedMemory(4096) as shm:
        yield shm.buf


def _mutex(core: ModuleType, block: memoryview, create: bool = False) -> Any:
    mutex = core.RobustMutex()
    assert mutex._bind(block, 0, create, "test mutex")
    return mutex


def _holder_child(lock: Any, pipe: Pipe) -> int:
    """Fork a child that takes ``lock``, says so, and sleeps holding it."""

    def hold() -> None:
        lock.acquire()
        pipe.send()
        signal.pause()

    pid = fork(hold)
    pipe.recv()
    return pid


# -- the mutex's contract, on each path --------------------------------------------------------


def test_acquire_release_owner_and_locked(core: ModuleType, block: memoryview) -> None:
    mutex = _mutex(core, block, create=True)
    assert not mutex.locked() and mutex.owner is None
    assert mutex.acquire()
    assert mutex.locked() and mutex.owner == os.getpid()
    assert not mutex.previous_owner_died and mutex.dead_owner_pid is None
    mutex.release()
    assert not mutex.locked() and mutex.owner is None
    with mutex:
        assert mutex.locked()
    assert not mutex.locked()
    mutex._unbind()


def test_reacquire_by_the_holder_is_a_clear_error(core: ModuleType, block: memoryview) -> None:
    mutex = _mutex(core, block, create=True)
    with mutex:
        with pytest.raises(ipcfork.DeadlockError, match="not re-entrant"):
            mutex.acquire()
        with pytest.raises(ipcfork.DeadlockError):
            mutex.acquire(timeout=5)
        assert mutex.acquire(blocking=False) is False  # a try fails, as threading.Lock's
    assert not mutex.locked()
    mutex._unbind()


def test_only_the_holding_thread_may_release(core: ModuleType, block: memoryview) -> None:
    mutex = _mutex(core, block, create=True)
    with pytest.raises(ipcfork.NotOwnerError, match="held by nobody"):
        mutex.release()
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with mutex:
            taken.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(30)
    with pytest.raises(ipcfork.NotOwnerError, match="another thread of this process"):
        mutex.release()
    assert mutex.locked()  # the refused release changed nothing
    done.set()
    thread.join(30)
    assert not mutex.locked()
    mutex._unbind()


def test_a_thread_that_exits_holding_it_releases_it(core: ModuleType, block: memoryview) -> None:
    """The kernel walks a thread's robust list when the thread exits, not only the process."""
    mutex = _mutex(core, block, create=True)
    thread = threading.Thread(target=mutex.acquire)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert mutex.acquire(timeout=10)
    assert mutex.previous_owner_died and mutex.dead_owner_pid == os.getpid()
    assert mutex.recoveries == 1
    mutex.release()
    assert not mutex.previous_owner_died
    mutex._unbind()


def test_a_forked_child_of_the_holder_does_not_hold_it(core: ModuleType,
                                                       block: memoryview) -> None:
    mutex = _mutex(core, block, create=True)
    with mutex:
        def child() -> None:
            try:
                mutex.release()
            except ipcfork.NotOwnerError:
                os._exit(0 if mutex.locked() else 2)
            os._exit(1)

        assert reap(fork(child)) == 0
    assert not mutex.locked()
    mutex._unbind()


def test_timeout_waits_at_least_that_long(core: ModuleType, block: memoryview,
                                          pipe: Pipe) -> None:
    mutex = _mutex(core, block, create=True)

    pid = _holder_child(mutex, pipe)
    for timeout in (0, 0.05, 0.3):
        started = time.monotonic()
        assert mutex.acquire(timeout=timeout) is False
        assert time.monotonic() - started >= timeout * 0.9
    assert mutex.acquire(blocking=False) is False
    assert mutex.owner == pid
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    assert mutex.acquire(timeout=30) and mutex.dead_owner_pid == pid
    mutex.release()
    mutex._unbind()


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, "1", True, [1]])
def test_bad_timeouts_are_refused(core: ModuleType, block: memoryview, timeout: Any) -> None:
    mutex = _mutex(core, block, create=True)
    with pytest.raises(ipcfork.InvalidArgumentError, match="timeout must be"):
        mutex.acquire(timeout=timeout)
    with pytest.raises(ipcfork.InvalidArgumentError, match="makes no sense"):
        mutex.acquire(False, 1.0)
    assert not mutex.locked()
    mutex._unbind()


def test_close_while_held_is_refused_then_allowed(core: ModuleType, block: memoryview) -> None:
    mutex = _mutex(core, block, create=True)
    mutex.acquire()
    with pytest.raises(ipcfork.BufferInUseError, match="release it before closing"):
        mutex._unbind()
    mutex.release()
    mutex._unbind()
    for use in (mutex.acquire, mutex.release, mutex.locked):
        with pytest.raises(ipcfork.ObjectClosedError, match="closed"):
            use()


def test_binding_checks_before_touching_memory(core: ModuleType) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="does not fit"):
        core.RobustMutex()._bind(bytearray(64), 0, True, "small")
    with pytest.raises(ipcfork.InvalidArgumentError, match="does not fit"):
        core.RobustMutex()._bind(bytearray(256), 200, True, "past the end")
    with pytest.raises(ipcfork.InvalidArgumentError):
        core.RobustMutex()._bind(bytearray(256), 4, True, "misaligned")
    with pytest.raises((TypeError, BufferError, ipcfork.InvalidArgumentError)):
        core.RobustMutex()._bind(bytes(256), 0, True, "read-only")
    garbage = bytearray(b"\xff" * 256)
    with pytest.raises(ipcfork.ObjectCorruptError, match="does not hold an ipcfork mutex"):
        core.RobustMutex()._bind(garbage, 0, False, "garbage")
    assert core.RobustMutex()._bind(bytearray(256), 0, False, "not yet") is False


def test_atomic_words_check_offsets_and_values(core: ModuleType) -> None:
    memory = bytearray(64)
    words = core.AtomicWords(memory)
    assert words.fetch_add(8, 5) == 0 and words.load(8) == 5
    assert words.cas(8, 5, 7) == (True, 5) and words.cas(8, 5, 9) == (False, 7)
    assert words.exchange(8, -1) == 7 and words.fetch_and(8, 0xF0) == -1
    assert words.fetch_or(8, 1) == 0xF0 and words.load(8) == 0xF1
    words.store(56, (1 << 63) - 1)
    assert words.fetch_add(56, 1) == (1 << 63) - 1 and words.load(56) == -(1 << 63)  # wraps
    for offset in (-8, 3, 64, 1 << 70):
        with pytest.raises((ipcfork.InvalidArgumentError, OverflowError)):
            words.load(offset)
    for value in (1 << 63, -(1 << 63) - 1):
        with pytest.raises(ipcfork.InvalidArgumentError, match="int64"):
            words.store(0, value)
    words.close()
    with pytest.raises(ipcfork.ObjectClosedError):
        words.load(0)
    memory.extend(b"x")  # the buffer export was dropped: the bytearray may resize again


# -- signals during a wait ---------------------------------------------------------------------


def test_a_signal_during_a_wait_runs_its_handler_and_the_wait_goes_on(
        core: ModuleType, block: memoryview, pipe: Pipe, pipe2: Pipe) -> None:
    mutex = _mutex(core, block, create=True)

    def holder() -> None:
        mutex.acquire()
        pipe.send()
        pipe2.recv(60)  # released once the parent's handler has run
        mutex.release()
        os._exit(0)

    pid = fork(holder)
    pipe.recv()
    seen: list[int] = []

    def on_usr1(signum: int, frame: object) -> None:
        seen.append(signum)
        pipe2.send()

    with signal_once_blocked(signal.SIGUSR1, on_usr1):
        assert mutex.acquire(timeout=60)
    assert seen == [signal.SIGUSR1]
    mutex.release()
    assert reap(pid) == 0
    mutex._unbind()


def test_a_raising_handler_ends_the_wait_and_takes_nothing(core: ModuleType,
                                                           block: memoryview,
                                                           pipe: Pipe) -> None:
    mutex = _mutex(core, block, create=True)

    pid = _holder_child(mutex, pipe)

    class Interrupted(Exception):
        pass

    def on_usr1(signum: int, frame: object) -> None:
        raise Interrupted

    with pytest.raises(Interrupted), signal_once_blocked(signal.SIGUSR1, on_usr1):
        mutex.acquire()
    assert mutex.owner == pid  # still the child's: the interrupted wait took nothing
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    mutex._unbind()


# -- the two paths share one mutex -------------------------------------------------------------


@pytest.mark.parametrize("holder_path,waiter_path",
                         [("compiled", "ctypes"), ("ctypes", "compiled")])
def test_the_paths_share_one_mutex(holder_path: str, waiter_path: str, block: memoryview,
                                   pipe: Pipe, pipe2: Pipe) -> None:
    """A holder on one path excludes, wakes and (dying) is recovered by a waiter on the
    other: both call glibc on the same block."""
    holding, waiting = _path(holder_path), _path(waiter_path)
    waiter = _mutex(waiting, block, create=True)

    def holder(die: bool) -> None:
        mutex = _mutex(holding, block)
        mutex.acquire()
        pipe.send()
        if die:
            signal.pause()
        pipe2.recv(60)
        mutex.release()
        os._exit(0)

    pid = fork(holder, False)
    pipe.recv()
    assert waiter.owner == pid and waiter.locked()
    started = time.monotonic()
    assert not waiter.acquire(timeout=0.1)
    assert time.monotonic() - started >= 0.09
    pipe2.send()
    assert waiter.acquire(timeout=30) and not waiter.previous_owner_died
    waiter.release()
    assert reap(pid) == 0

    pid = fork(holder, True)
    pipe.recv()
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    assert waiter.acquire(timeout=30)
    assert waiter.previous_owner_died and waiter.dead_owner_pid == pid
    assert waiter.recoveries == 1
    waiter.release()
    waiter._unbind()


def test_a_waiter_sleeps_in_the_kernel_until_released(core: ModuleType, block: memoryview,
                                                      pipe: Pipe) -> None:
    mutex = _mutex(core, block, create=True)
    mutex.acquire()

    def waiter() -> None:
        other = _mutex(core, block)
        pipe.send()
        os._exit(0 if other.acquire(timeout=60) and other.owner == os.getpid() else 1)

    pid = fork(waiter)
    pipe.recv()
    assert wait_until_blocked(pid).startswith("futex on /dev/shm/")
    mutex.release()
    assert reap(pid) == 0  # it exited holding the mutex: the kernel released it
    assert mutex.acquire(timeout=10) and mutex.previous_owner_died
    mutex.release()
    mutex._unbind()


# -- chaos: random SIGKILLs, many times over ---------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["posix", "sysv"])
def test_random_sigkills_never_wedge_the_mutex(backend: str) -> None:
    """Three workers loop on ``with lock: counter += 1``; a random one is SIGKILLed every
    0.5-4 ms and replaced.  After every kill the counter must move on again (a wedged lock
    would stop it), and at the end the parent takes the lock at once."""
    kills = 600 if _native.PATH == "compiled" else 200
    lock = ipcfork.Mutex(backend=backend)
    shm = ipcfork.SharedMemory(8)
    counter = shm.buf.cast("q")
    rng = random.Random(8)

    def worker() -> None:
        while True:
            with lock:
                counter[0] += 1

    workers = [fork(worker) for _ in range(3)]
    try:
        for kill in range(kills):
            time.sleep(rng.uniform(0.0005, 0.004))  # the chaos interval, not a synchronisation
            victim = workers.pop(rng.randrange(len(workers)))
            os.kill(victim, signal.SIGKILL)
            assert reap(victim) == -signal.SIGKILL
            workers.append(fork(worker))
            if kill % 50 == 49:  # the survivors must still make progress
                seen, deadline = counter[0], time.monotonic() + 10
                while counter[0] == seen:
                    assert time.monotonic() < deadline, f"wedged after {kill + 1} kills"
                    time.sleep(0.001)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
    assert lock.acquire(timeout=10), "the lock stayed taken after the last kill"
    lock.release()
    if backend == "posix":
        assert lock.recoveries > 0  # some kills landed inside the critical section
    counter.release()
    shm.close()
    lock.close()


# -- which path is in use ----------------------------------------------------------------------


@pytest.mark.parametrize("pure", ["1", ""])
def test_ipcfork_info_says_which_core_is_in_use(pure: str) -> None:
    """``ipcfork info`` prints what docs/primitives.md says it prints."""
    import subprocess
    import sys

    env = {**os.environ, "IPCFORK_PURE": pure}
    shown = subprocess.run([sys.executable, "-m", "ipcfork", "info"], env=env, check=True,
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert shown[0].startswith(f"ipcfork {ipcfork.__version__} on Python ")
    if pure:
        assert shown[1] == "core: ctypes (IPCFORK_PURE is set)"
    elif compiled is not None:
        assert shown[1] == "core: compiled (the C extension ipcfork._os.native._core)"
    else:
        assert shown[1].startswith("core: ctypes (the C extension is not built")


# -- what a review found (each failed before its fix) ------------------------------------------


@pytest.mark.parametrize("backend", ["posix", "sysv"])
def test_close_is_refused_while_a_thread_waits(backend: str, pipe: Pipe) -> None:
    """Closing a mutex that another thread of this process waits for would unmap what the
    wait writes to (it crashed the interpreter): refused until the wait is over."""
    mutex = ipcfork.Mutex(backend=backend)
    pid = _holder_child(mutex, pipe)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(mutex.acquire(timeout=60)))
    waiter.start()
    assert waiter.native_id is not None
    wait_until_blocked(waiter.native_id)
    with pytest.raises(ipcfork.BufferInUseError, match="waited for by a thread"):
        mutex.close()
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    waiter.join(60)
    assert got == [True]
    if backend == "sysv":  # the holder is this process, whose thread took it
        with pytest.raises(ipcfork.BufferInUseError, match="release it before closing"):
            mutex.close()
        mutex.release()
    else:  # the holder was the thread, which exited holding it: the kernel released it
        assert mutex.acquire(timeout=10) and mutex.previous_owner_died
        mutex.release()
    mutex.close()


def test_a_handle_does_not_release_for_a_later_thread(core: ModuleType, block: memoryview) -> None:
    """glibc reuses a finished thread's pthread_t at once: a handle whose taker exited must
    not accept a release from the next thread that takes the mutex through another handle."""
    first = _mutex(core, block, create=True)
    second = _mutex(core, block)
    taker = threading.Thread(target=first.acquire)
    taker.start()
    taker.join(30)
    outcome: list[str] = []

    def later() -> None:
        assert second.acquire(timeout=10) and second.previous_owner_died
        try:
            first.release()
            outcome.append("accepted")
        except ipcfork.NotOwnerError:
            outcome.append("refused")
        outcome.append("still held" if second.locked() else "released")
        second.release()

    thread = threading.Thread(target=later)
    thread.start()
    thread.join(30)
    assert outcome == ["refused", "still held"]
    first._unbind()  # its taker is gone: nothing of this process holds it through `first`
    second._unbind()


def test_sysv_close_while_held_is_refused() -> None:
    mutex = ipcfork.Mutex(backend="sysv")
    mutex.acquire()
    with pytest.raises(ipcfork.BufferInUseError, match="release it before closing"):
        mutex.close()
    mutex.release()
    mutex.close()


def test_sysv_set_removed_while_waiting_is_not_found(keyfile: str, pipe: Pipe) -> None:
    mutex = ipcfork.Mutex(keyfile, backend="sysv")
    pid = _holder_child(mutex, pipe)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            mutex.acquire(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waiter.native_id is not None
    wait_until_blocked(waiter.native_id)
    mutex.unlink()
    waiter.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ipcfork.ObjectNotFoundError)
    assert "was removed" in str(errors[0])
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    mutex.close()


@pytest.mark.parametrize("backend", ["posix", "sysv"])
def test_a_raising_handler_never_orphans_a_timed_or_try_acquire(backend: str) -> None:
    """As the tight ``with`` test, for ``acquire(timeout=...)`` and ``acquire(False)``: the
    lock is never left taken with nobody recorded as its holder."""
    if _native.PATH != "compiled":
        pytest.skip("the ctypes fallback's Python methods have such windows (documented)")
    mutex = ipcfork.Mutex(backend=backend)

    def try_then_timed() -> None:
        if mutex.acquire(False):
            mutex.release()
        if mutex.acquire(timeout=5):
            mutex.release()

    def check(interruption: int) -> None:
        if mutex.locked():  # taken between a returning acquire and its release: ours
            assert mutex.owner == os.getpid(), f"orphaned at {interruption}: {mutex!r}"
            mutex.release()

    interrupt_repeatedly(try_then_timed, check, interval=0.00003)
    assert not mutex.locked()
    mutex.close()
