"""ForkPool(zygote=True): every task forked from a small helper made with the pool."""

from __future__ import annotations

import os
import signal
import time

import pytest

import ipcfork
from ipcfork import ChildCrashedError, ForkPool, TaskTimeoutError, testing


def square(x: int) -> int:
    return x * x


def parent_pid() -> int:
    return os.getppid()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fail() -> None:
    raise OSError(5, "disk on fire")


def test_tasks_are_forked_by_the_zygote() -> None:
    with ForkPool(2, zygote=True) as pool:
        zygote = testing.children()
        assert len(zygote) == 1
        future = pool.submit(parent_pid)
        assert future.result(timeout=30) == zygote[0] != os.getpid()
        assert future.record.pid not in (os.getpid(), zygote[0])
        assert future.record.exitcode == 0 and future.record.maxrss_kib
        assert [f.result(timeout=30) for f in [pool.submit(square, i) for i in range(20)]] \
            == [i * i for i in range(20)]


def test_outcomes_through_the_zygote() -> None:
    with ForkPool(1, zygote=True, timeout=0.5, grace=0.2) as pool:
        with pytest.raises(OSError, match="disk on fire"):
            pool.submit(fail).result(timeout=30)
        with pytest.raises(ChildCrashedError) as info:
            pool.submit(kill_self).result(timeout=30)
        assert info.value.signal == signal.SIGKILL
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError):
            pool.submit(time.sleep, 60).result(timeout=30)
        assert time.monotonic() - start >= 0.5 * 0.9  # not ended before its timeout
        assert len(pool.submit(bytes, 3_000_000).result(timeout=30)) == 3_000_000
        with pytest.raises(Exception, match=r"lambda|pickle"):
            pool.submit(lambda: 1).result(timeout=30)  # the call is pickled to the zygote
        assert pool.submit(square, 5).result(timeout=30) == 25


def test_a_dead_zygote_is_replaced() -> None:
    with ForkPool(1, zygote=True) as pool:
        assert pool.submit(square, 2).result(timeout=30) == 4
        (first,) = testing.children()
        stuck = pool.submit(time.sleep, 60)
        while stuck.record.pid is None:  # the zygote reports the child it forked
            os.sched_yield()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ChildCrashedError):
            stuck.result(timeout=30)
        assert pool.submit(square, 3).result(timeout=30) == 9
        (second,) = testing.children()  # one zygote again: a new one
        assert second != first


def test_unused_pool_stops_its_zygote() -> None:
    pool = ForkPool(1, zygote=True)
    assert len(testing.children()) == 1
    pool.shutdown()
    assert testing.children() == []


def test_zygote_needs_fork_per_task() -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="tasks_per_child"):
        ForkPool(1, zygote=True, tasks_per_child=None)
