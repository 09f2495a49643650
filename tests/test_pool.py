"""ForkPool: outcomes, the crash matrix, executor conventions, exactly-once accounting."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import random
import signal
import threading
import time
from typing import Any

import pytest

import ipcfork
from ipcfork import ChildCrashedError, ForkPool, TaskTimeoutError


def _still_works(pool: ForkPool) -> None:
    assert pool.submit(lambda: "alive").result(timeout=30) == "alive"


def test_result_and_record() -> None:
    with ForkPool(2) as pool:
        future = pool.submit(lambda a, b=0: (os.getpid(), a + b), 40, b=2)
        child_pid, value = future.result(timeout=30)
        assert value == 42 and child_pid != os.getpid()
        record = future.record
        assert record.pid == child_pid and record.exitcode == 0 and record.signal is None
        assert record.outcome == "result" and record.attempts == 1
        assert record.wall_time is not None and record.wall_time > 0
        assert record.maxrss_kib and record.maxrss_kib > 0
        assert record.utime is not None and record.stime is not None


def test_closures_and_large_data_are_not_pickled() -> None:
    big = bytearray(50 * 1024 * 1024)  # reaches the child by copy-on-write
    big[-1] = 7
    lock = threading.Lock()  # unpicklable, and fine: nothing is pickled on the way in
    with ForkPool(1) as pool:
        assert pool.submit(lambda: (big[-1], lock.locked())).result(timeout=30) == (7, False)


def _raise_value_error() -> None:
    raise ValueError("bad input 17")


def test_exception_keeps_type_and_child_traceback() -> None:
    with ForkPool(1) as pool:
        with pytest.raises(ValueError, match="bad input 17") as info:
            pool.submit(_raise_value_error).result(timeout=30)
        cause = info.value.__cause__
        assert isinstance(cause, ipcfork.RemoteTraceback)
        assert "_raise_value_error" in str(cause) and "Traceback" in str(cause)
        _still_works(pool)


class _LoadsBadly:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_on_load, ())


def _explode_on_load() -> None:
    raise RuntimeError("cannot load this result")


class _DiesWhilePickled:
    def __reduce__(self) -> tuple[Any, ...]:
        os.kill(os.getpid(), signal.SIGKILL)
        return (int, ())  # pragma: no cover


def _segfault() -> None:
    import faulthandler

    faulthandler.disable()  # pytest's dump of the child's stack would only be noise
    ctypes.string_at(0)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _huge_result() -> bytes:
    return os.urandom(1024) * 4096  # 4 MiB, far past a pipe buffer


CRASHES = {
    "os._exit": (lambda: os._exit(3), ChildCrashedError, {"exitcode": 3}),
    "SIGKILL": (_sigkill_self, ChildCrashedError, {"signal": signal.SIGKILL}),
    "SIGSEGV": (_segfault, ChildCrashedError, {"signal": signal.SIGSEGV}),
    "sys.exit": (lambda: exit(5), ChildCrashedError, {"exitcode": 5}),
    "unpicklable result": (lambda: (lambda: 1), Exception, {}),
    "result fails to load": (lambda: _LoadsBadly(), RuntimeError, {}),
    "death mid-transfer": (lambda: _DiesWhilePickled(), ChildCrashedError,
                           {"signal": signal.SIGKILL}),
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_crash_matrix_fails_only_that_task(case: str) -> None:
    fn, expected, facts = CRASHES[case]
    with ForkPool(2) as pool:
        with pytest.raises(expected) as info:
            pool.submit(fn).result(timeout=30)
        for attr, value in facts.items():
            assert getattr(info.value, attr) == value
        if isinstance(info.value, ChildCrashedError):
            assert info.value.pid and str(info.value.pid) in str(info.value)
        _still_works(pool)


def test_result_larger_than_a_pipe_buffer_is_byte_exact() -> None:
    with ForkPool(1) as pool:
        expected = pool.submit(_huge_result)
        data = expected.result(timeout=30)
        assert len(data) == 4 * 1024 * 1024 and data == data[:1024] * 4096
        _still_works(pool)


def test_numpy_result_comes_back_without_a_copy() -> None:
    np = pytest.importorskip("numpy")
    with ForkPool(1) as pool:
        array = pool.submit(lambda: np.arange(1_000_000, dtype=np.int64)).result(timeout=30)
        assert int(array.sum()) == 999_999 * 1_000_000 // 2
        assert not array.flags.owndata  # a view of the shared memory the child wrote


def test_timeout_terminates_then_kills() -> None:
    def stubborn() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)

    with ForkPool(1, timeout=0.2, grace=0.2) as pool:
        start = time.monotonic()
        future = pool.submit(stubborn)
        with pytest.raises(TaskTimeoutError, match=r"timeout=0\.2"):
            future.result(timeout=30)
        # SIGTERM after the timeout was ignored: SIGKILL came after the grace as well
        assert time.monotonic() - start >= (0.2 + 0.2) * 0.9
        assert future.record.signal == signal.SIGKILL and future.record.outcome == "timeout"
        start = time.monotonic()
        polite = pool.submit(time.sleep, 60)
        with pytest.raises(TaskTimeoutError):
            polite.result(timeout=30)
        assert time.monotonic() - start >= 0.2 * 0.9  # not ended before its timeout
        assert polite.record.signal == signal.SIGTERM
        _still_works(pool)


def test_retries_rerun_failed_tasks() -> None:
    attempts = ipcfork.SharedMemory(8)
    count = attempts.buf.cast("Q")

    def flaky() -> int:
        count[0] += 1
        if count[0] < 3:
            os._exit(9)
        return int(count[0])

    with ForkPool(1, retries=2) as pool:
        future = pool.submit(flaky)
        assert future.result(timeout=30) == 3
        assert future.record.attempts == 3
    with ForkPool(1, retries=1) as pool:
        count[0] = 0
        with pytest.raises(ChildCrashedError):
            pool.submit(flaky).result(timeout=30)
    count.release()
    attempts.close()


def behave(i: int, how: str) -> int:
    """A task that returns, raises, exits or dies as told (module level: it pickles)."""
    if how == "raise":
        raise KeyError(i)
    if how == "exit":
        os._exit(4)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@pytest.mark.parametrize(("tasks_per_child", "n"), [(1, 400), (None, 600)],
                         ids=["fork-per-task", "persistent"])
def test_exactly_once_accounting_with_random_crashes(tasks_per_child: int | None,
                                                     n: int) -> None:
    rng = random.Random(1234)
    plan = [rng.choice(["ok"] * 6 + ["raise", "exit", "kill"]) for _ in range(n)]
    with ForkPool(4, tasks_per_child=tasks_per_child) as pool:
        futures = [pool.submit(behave, i, how) for i, how in enumerate(plan)]
        _, not_done = cf.wait(futures, timeout=300)
    assert not not_done
    for i, (future, how) in enumerate(zip(futures, plan, strict=True)):
        if how == "ok":
            assert future.result() == i
        elif how == "raise":
            assert isinstance(future.exception(), KeyError)
        else:
            assert isinstance(future.exception(), ChildCrashedError)
        assert future.record.attempts == 1


def test_children_exiting_at_once_lose_no_outcome() -> None:
    n = 24
    gate = ipcfork.Semaphore(0)
    with ForkPool(n) as pool:
        futures = [pool.submit(lambda i=i: gate.acquire(timeout=60) and i) for i in range(n)]
        gate.release(n)  # all exit together: their exits arrive as one burst
        assert sorted(f.result(timeout=60) for f in futures) == list(range(n))
    gate.close()


def test_executor_conventions() -> None:
    with ForkPool(1) as pool:
        blocker = ipcfork.Semaphore(0)
        first = pool.submit(blocker.acquire, timeout=60)
        queued = pool.submit(lambda: "never")
        assert queued.cancel() and queued.cancelled()
        seen: list[Any] = []
        first.add_done_callback(lambda f: seen.append(f.result()))
        blocker.release()
        assert first.result(timeout=30) is True
        assert [f.result() for f in cf.as_completed([pool.submit(int, "7")])] == [7]
        results = pool.map(lambda x: 10 // x, [5, 2, 0, 1])
        assert next(results) == 2 and next(results) == 5
        with pytest.raises(ZeroDivisionError):
            next(results)
        blocker.close()
    assert seen == [True]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(int)


def test_shutdown_cancel_futures() -> None:
    gate, started = ipcfork.Semaphore(0), ipcfork.Semaphore(0)
    pool = ForkPool(1)
    running = pool.submit(lambda: started.release() or gate.acquire(timeout=60))
    waiting = [pool.submit(int, i) for i in range(5)]
    assert started.acquire(timeout=60)  # the first task runs; the others wait their turn
    gate.release()
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result() is True
    assert all(f.cancelled() for f in waiting)
    gate.close()
    started.close()


def test_imap_unordered_is_lazy() -> None:
    produced = 0

    def items() -> Any:
        nonlocal produced
        for i in range(40):
            produced += 1
            yield i

    with ForkPool(2) as pool:
        seen = 0
        for value in pool.imap_unordered(lambda x: x * 2, items(), in_flight=3):
            seen += 1
            assert produced - seen <= 3  # never more than in_flight ahead
            assert value % 2 == 0
        assert seen == 40


def test_handlers_restored_after_the_pool() -> None:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with ForkPool(1) as pool:
        assert signal.getsignal(signal.SIGINT) != before[0]
        _still_works(pool)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_forking_with_other_threads_warns() -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="busy-worker")
    other.start()
    try:
        with ForkPool(1) as pool, pytest.warns(ipcfork.ForkSafetyWarning, match="busy-worker"):
            _still_works(pool)
    finally:
        stop.set()
        other.join()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 10**9])
def test_bad_max_workers(bad: Any) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="max_workers"):
        ForkPool(bad)


@pytest.mark.parametrize("bad", [0, -1])
@pytest.mark.parametrize("mode", [{}, {"tasks_per_child": None}, {"zygote": True}])
def test_max_workers_below_one_says_what_concurrent_futures_says(
        bad: int, mode: dict[str, Any]) -> None:
    # A drop-in Executor: code that matches ProcessPoolExecutor's message must match ours.
    with pytest.raises(ValueError) as theirs:
        cf.ProcessPoolExecutor(bad)
    with pytest.raises(ValueError, match=f"^{theirs.value}") as ours:
        ForkPool(bad, **mode)
    assert isinstance(ours.value, ipcfork.InvalidArgumentError)
    assert str(ours.value).startswith("max_workers must be greater than 0")


def test_bad_options() -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="timeout"):
        ForkPool(1, timeout=-1)
    with pytest.raises(ipcfork.InvalidArgumentError, match="retries"):
        ForkPool(1, retries=-1)


def test_pools_shut_down_in_any_order_restore_the_original_handlers() -> None:
    original = signal.getsignal(signal.SIGINT)
    first, second = ForkPool(1), ForkPool(1)
    first.shutdown()
    assert signal.getsignal(signal.SIGINT) != original  # the second pool still needs it
    second.shutdown()
    assert signal.getsignal(signal.SIGINT) is original


def test_callbacks_run_outside_the_pool_lock() -> None:
    gate, started = ipcfork.Semaphore(0), ipcfork.Semaphore(0)
    pool = ForkPool(1)
    pool.submit(lambda: started.release() or gate.acquire(timeout=60))
    queued = pool.submit(int, 1)
    seen: list[str] = []

    def resubmit(future: cf.Future[Any]) -> None:
        try:
            pool.submit(int, 2)  # would deadlock if the pool's lock were held here
        except RuntimeError as exc:
            seen.append(str(exc))

    queued.add_done_callback(resubmit)
    assert started.acquire(timeout=60)
    gate.release()
    pool.shutdown(cancel_futures=True)
    assert queued.cancelled() and seen == ["cannot schedule new futures after shutdown"]
    gate.close()
    started.close()
