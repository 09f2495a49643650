"""ForkPool with persistent workers (tasks_per_child=None or N): pickled calls, queued
tasks, crashes and timeouts that cost only the running task, recycling."""

from __future__ import annotations

import os
import pickle
import signal
import time
from typing import Any

import pytest
from test_pool import behave

import ipcfork
from ipcfork import ChildCrashedError, ForkPool, TaskTimeoutError


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise LookupError(message)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def pid_of_worker() -> int:
    return os.getpid()


def test_results_exceptions_and_reuse() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        futures = [pool.submit(square, i) for i in range(50)]
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(50)]
        assert len({f.record.pid for f in futures}) <= 2  # the same workers ran them all
        with pytest.raises(LookupError, match="nope") as info:
            pool.submit(fail, "nope").result(timeout=30)
        assert "fail" in str(info.value.__cause__)
        assert len(pool.submit(bytes, 5_000_000).result(timeout=30)) == 5_000_000


def test_unpicklable_call_fails_at_once() -> None:
    with ForkPool(1, tasks_per_child=None) as pool:
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pool.submit(lambda: 1).result(timeout=30)
        assert pool.submit(square, 3).result(timeout=30) == 9


def test_worker_crash_fails_only_the_running_task() -> None:
    with ForkPool(1, tasks_per_child=None) as pool:
        doomed = pool.submit(kill_self)
        queued = [pool.submit(square, i) for i in range(5)]  # behind it in the same worker
        with pytest.raises(ChildCrashedError) as info:
            doomed.result(timeout=30)
        assert info.value.signal == signal.SIGKILL
        assert [f.result(timeout=30) for f in queued] == [0, 1, 4, 9, 16]
        assert all(f.record.attempts == 1 for f in queued)


def test_timeout_kills_the_worker_and_spares_the_queue() -> None:
    with ForkPool(1, tasks_per_child=None, timeout=0.3, grace=0.3) as pool:
        start = time.monotonic()
        slow = pool.submit(time.sleep, 60)
        after = pool.submit(square, 6)
        with pytest.raises(TaskTimeoutError):
            slow.result(timeout=30)
        assert time.monotonic() - start >= 0.3 * 0.9  # not ended before its timeout
        assert after.result(timeout=30) == 36


def test_tasks_per_child_recycles_workers() -> None:
    with ForkPool(1, tasks_per_child=3) as pool:
        pids = [pool.submit(pid_of_worker).result(timeout=30) for _ in range(9)]
    assert len(set(pids)) == 3
    assert all(pids.count(pid) == 3 for pid in set(pids))


def test_map_chunks_keep_order_and_raise_in_place() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        assert list(pool.map(square, range(1000))) == [i * i for i in range(1000)]
        assert list(pool.map(pow, [2, 3], [5, 2], chunksize=1)) == [32, 9]
        results = pool.map(behave, range(10), ["ok"] * 5 + ["raise"] + ["ok"] * 4,
                           chunksize=2)
        assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(KeyError):
            list(results)
        with pytest.raises(ipcfork.InvalidArgumentError, match="chunksize"):
            pool.map(square, [1], chunksize=0)


def test_imap_unordered_with_workers() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        assert sorted(pool.imap_unordered(square, range(300))) == [i * i for i in range(300)]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_tasks_per_child(bad: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="tasks_per_child"):
        ForkPool(1, tasks_per_child=bad)  # type: ignore[arg-type]


def sleep_then(value: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(value)


def test_large_queued_arguments_never_stall_timeouts() -> None:
    """A task with a big argument queued behind a long one must not block the manager:
    the long one still times out on time."""
    with ForkPool(1, tasks_per_child=None, timeout=0.5, grace=0.2) as pool:
        start = time.monotonic()
        slow = pool.submit(sleep_then, b"", 60)
        big = pool.submit(sleep_then, b"x" * 4_000_000, 0)  # far more than a pipe holds
        with pytest.raises(TaskTimeoutError):
            slow.result(timeout=30)
        assert time.monotonic() - start >= 0.5 * 0.9  # not ended before its timeout
        assert big.result(timeout=30) == 4_000_000


class Box:
    """A callable's owner that is also its argument: the two must stay one object."""

    def same(self, other: object) -> bool:
        return self is other


def test_calls_are_cached_by_function_and_shared_objects_stay_shared() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        assert list(pool.map(square, range(300), chunksize=1)) == [x * x for x in range(300)]
        assert list(pool.map(abs, [-1, -2, 3], chunksize=1)) == [1, 2, 3]  # a builtin
        box = Box()
        assert pool.submit(box.same, box).result(timeout=30) is True
        assert pool.submit(pow, 2, 10).result(timeout=30) == 1024
        # A bound method of a C object pickles its object: never a stale copy of it.
        data = [1]
        assert pool.submit(data.count, 1).result(timeout=30) == 1
        data.append(1)
        assert pool.submit(data.count, 1).result(timeout=30) == 2


@pytest.mark.parametrize("kind", ["range", "list", "tuple", "iterator"])
def test_map_chunks_ranges_lists_tuples_and_generators_alike(kind: str) -> None:
    items = {"range": range, "list": list, "tuple": tuple, "iterator": iter}[kind](
        range(1000)) if kind != "range" else range(1000)
    with ForkPool(2, tasks_per_child=None) as pool:
        assert list(pool.map(square, items, chunksize=7)) == [x * x for x in range(1000)]


def _batch_sizes(fn: Any, items: Any) -> tuple[list[int], list[Any]]:
    """Run a real stream on a persistent pool, noting how many items each task carried."""
    from ipcfork.pool.streaming import stream_unordered
    from ipcfork.pool.tasks import apply_chunk

    sizes: list[int] = []
    with ForkPool(2, tasks_per_child=None) as pool:
        def start(sink: Any, task_fn: Any, *args: Any) -> Any:
            sizes.append(len(args[1]) if task_fn is apply_chunk else 1)
            return pool._manager.stream_task(sink, task_fn, *args)

        results = list(stream_unordered(start, fn, items, in_flight=None, depth=32,
                                        chunksize=None))
    return sizes, results


def test_short_items_travel_in_growing_batches() -> None:
    sizes, results = _batch_sizes(abs, range(-20_000, 0))
    assert sorted(results) == list(range(1, 20_001))
    assert sizes[0] == 1  # nothing is known about the items yet
    assert sum(sizes) == 20_000
    assert max(sizes) >= 64  # microsecond items: batches grew
    assert len(sizes) < 2_000  # instead of 20,000 round trips


def test_slow_items_still_travel_alone() -> None:
    sizes, results = _batch_sizes(_sleepy_identity, range(12))
    assert sorted(results) == list(range(12))
    assert sizes[0] == 1 and max(sizes) <= 2  # 5 ms items: no batch beyond the first growth


def _sleepy_identity(i: int) -> int:
    time.sleep(0.005)
    return i


def test_imap_unordered_chunksize_one_sends_each_item_alone_and_checks_its_argument() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        assert sorted(pool.imap_unordered(abs, range(-50, 0), chunksize=1)) == list(
            range(1, 51))
        assert sorted(pool.imap_unordered(abs, range(-50, 0), chunksize=8)) == list(
            range(1, 51))
        with pytest.raises(ipcfork.InvalidArgumentError, match="chunksize"):
            pool.imap_unordered(abs, [1], chunksize=0)
        with pytest.raises(ipcfork.InvalidArgumentError, match="not callable"):
            pool.imap_unordered(42, [1])  # type: ignore[arg-type]


def test_a_failing_item_in_a_batch_raises_and_the_stream_cancels_the_rest() -> None:
    with ForkPool(2, tasks_per_child=None) as pool:
        stream = pool.imap_unordered(_fails_at_500, range(5_000))
        with pytest.raises(ValueError, match="item 500"):
            list(stream)
        assert sorted(pool.imap_unordered(abs, range(-5, 0))) == [1, 2, 3, 4, 5]  # lives on


def _fails_at_500(i: int) -> int:
    if i == 500:
        raise ValueError("item 500")
    return i
