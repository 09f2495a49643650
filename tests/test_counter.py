"""SharedCounter: exact under contention, linearizable where promised, and intact after a
process dies by SIGKILL at any point."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest
from conftest import Pipe, fork, reap

import ipcfork
from ipcfork import SharedCounter
from ipcfork import counter as counter_module

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def test_add_value_and_the_linearizable_operations() -> None:
    with SharedCounter(5) as counter:
        counter.add()
        counter.add(10)
        counter.add(-3)
        assert counter.value == 13
        assert counter.add_and_get(2) == 15
        assert counter.add_and_get(0) == 15
        assert counter.compare_and_set(15, 100)
        assert not counter.compare_and_set(15, 7)
        assert counter.value == 100
        counter.add(2**40)  # past the stripe range: straight to pending
        assert counter.value == 100 + 2**40
        assert "value=" in repr(counter)


def test_arithmetic_wraps_like_int64() -> None:
    with SharedCounter(INT64_MAX) as counter:
        counter.add()
        assert counter.value == INT64_MIN
        assert counter.add_and_get(-1) == INT64_MAX
        assert counter.compare_and_set(INT64_MAX, INT64_MIN)
        assert counter.value == INT64_MIN


@pytest.mark.parametrize("bad", [1.5, 2**63, INT64_MIN - 1, True, "1", None])
def test_bad_amounts_are_refused_and_change_nothing(bad: object) -> None:
    with SharedCounter(3) as counter:
        with pytest.raises(ipcfork.InvalidArgumentError, match=r"int64|2\*\*63"):
            counter.add(bad)  # type: ignore[arg-type]
        with pytest.raises(ipcfork.InvalidArgumentError):
            counter.add_and_get(bad)  # type: ignore[arg-type]
        with pytest.raises(ipcfork.InvalidArgumentError):
            counter.compare_and_set(3, bad)  # type: ignore[arg-type]
        assert counter.value == 3
    with pytest.raises(ipcfork.InvalidArgumentError):
        SharedCounter(bad)  # type: ignore[arg-type]


def test_closed_counter_raises() -> None:
    counter = SharedCounter()
    counter.close()
    counter.close()
    for use in (counter.add, lambda: counter.value, counter.add_and_get):
        with pytest.raises(ipcfork.ObjectClosedError):
            use()
    assert "closed" in repr(counter)


def _times(n: int, step: object, *args: int) -> None:
    for _ in range(n):
        step(*args)  # type: ignore[operator]


def _in_threads(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread of this process, all at once; wait for them."""
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _run_children(*bodies: object) -> None:
    pids = [fork(body) for body in bodies]  # type: ignore[arg-type]
    assert [reap(pid) for pid in pids] == [0] * len(pids)


def test_adds_from_four_processes_are_exact() -> None:
    with SharedCounter() as counter:

        def adder() -> None:
            for i in range(20_000):
                counter.add(1 if i % 2 else 3)

        _run_children(adder, adder, adder, adder)
        assert counter.value == 4 * 10_000 * 4


def test_mixed_operations_from_four_processes_are_exact() -> None:
    """Adds, add_and_get and compare_and_set together: the counter flips between its
    striped and central regimes many times and loses nothing."""
    with SharedCounter() as counter:

        def adder() -> None:
            for _ in range(30_000):
                counter.add()

        def getter() -> None:
            for i in range(6_000):
                if i % 3:
                    counter.add_and_get(1)
                else:
                    while True:  # a compare-and-set increment
                        seen = counter.add_and_get(0)
                        if counter.compare_and_set(seen, seen + 1):
                            break

        _run_children(adder, adder, getter, getter)
        assert counter.value == 2 * 30_000 + 2 * 6_000


def test_add_and_get_returns_distinct_increasing_totals() -> None:
    """Linearizable: with adds of 1 only, every add_and_get returns a total no other call
    returned, each process sees its totals increase, and none exceeds the final total."""
    with SharedCounter() as counter, ipcfork.SharedArray("q", 4 * 3000) as seen:

        def getter(slot: int) -> None:
            last = 0
            for i in range(3000):
                total = counter.add_and_get(1)
                assert total > last
                seen[slot * 3000 + i] = last = total

        def adder() -> None:
            for _ in range(20_000):
                counter.add()

        _run_children(*(lambda s=s: getter(s) for s in range(4)), adder)
        totals = seen.tolist()
        assert len(set(totals)) == len(totals)
        assert max(totals) <= counter.value == 4 * 3000 + 20_000


def test_threads_and_processes_together_are_exact() -> None:
    with SharedCounter() as counter:

        def threaded() -> None:
            def work() -> None:
                for i in range(5000):
                    if i % 100 == 0:
                        counter.add_and_get(1)
                    else:
                        counter.add(1)

            _in_threads(work, work, work)

        _run_children(threaded, threaded)
        assert counter.value == 2 * 3 * 5000


def test_more_processes_over_its_life_than_stripes() -> None:
    """Stripes of dead processes are taken over with their counts; when every stripe
    belongs to a live process, a newcomer adds through pending."""
    with SharedCounter() as counter:
        for _ in range(counter_module.STRIPES + 16):  # one after another: adoption
            _run_children(lambda: _times(10, counter.add, 2))
        assert counter.value == (counter_module.STRIPES + 16) * 20
        hold, release = Pipe(), Pipe()
        try:

            def holder() -> None:
                counter.add(1)
                hold.send()
                release.recv(timeout=60)

            pids = [fork(holder) for _ in range(counter_module.STRIPES + 2)]
            for _ in pids:
                hold.recv()
            release.send(b"x" * len(pids))
            assert [reap(pid) for pid in pids] == [0] * len(pids)
        finally:
            hold.close()
            release.close()
        assert counter.value == (counter_module.STRIPES + 16) * 20 + counter_module.STRIPES + 2


@pytest.mark.parametrize("operation", ["add", "add_and_get"])
def test_sigkill_mid_operation_leaves_the_counter_exact_and_usable(operation: str,
                                                                  pipe: Pipe) -> None:
    """A process is SIGKILLed while it hammers the counter with adds of 1; others add
    multiples of 2**32.  The low 32 bits then count the victim's finished adds, the high
    bits must be exactly the survivors' total: nothing torn, nothing lost."""
    unit = 2**32
    started = pipe
    with SharedCounter() as counter:

        def victim() -> None:
            step = counter.add if operation == "add" else counter.add_and_get
            for i in range(10**9):
                step(1)
                if i == 1000:
                    started.send()

        def survivor() -> None:
            for i in range(5000):
                counter.add(unit)
                if i % 500 == 0:
                    counter.add_and_get(0)

        pid = fork(victim)
        started.recv()
        survivors = [fork(survivor) for _ in range(2)]
        os.kill(pid, signal.SIGKILL)
        assert reap(pid) == -signal.SIGKILL
        assert [reap(p) for p in survivors] == [0, 0]
        total = counter.value
        assert total // unit == 2 * 5000 and total % unit > 1000
        # usable: both regimes still work, from a process that adopts the dead stripe
        _run_children(lambda: _times(10_000, counter.add),
                      lambda: _times(1000, counter.add_and_get, 1))
        assert counter.value == total + 11_000
        assert counter.add_and_get(0) == total + 11_000


def test_lock_holder_killed_half_way_through_a_transition() -> None:
    """A process dies holding the counter's lock after freezing a third of the stripes
    (as if SIGKILLed inside the switch to the central regime); the next user finishes the
    job and no count is lost."""
    with SharedCounter() as counter:
        _run_children(*[lambda: _times(1000, counter.add)] * 3)

        def half_switch() -> None:
            counter._lock.acquire()
            for index in range(counter_module.STRIPES // 3):
                counter._freeze(index)
            os.kill(os.getpid(), signal.SIGKILL)

        pid = fork(half_switch)
        assert reap(pid) == -signal.SIGKILL
        assert counter.value == 3000
        assert counter.add_and_get(5) == 3005
        _run_children(lambda: _times(10_000, counter.add))
        assert counter.value == 13_005


def test_lock_holder_killed_half_way_through_a_thaw() -> None:
    """The way back to stripes, cut short by SIGKILL after half of the stripes thawed."""
    with SharedCounter() as counter:
        counter.add(4)
        # central (the first call, through the lock), then pinned (the second); the pin
        # dies with the child
        _run_children(lambda: _times(2, counter.add_and_get, 1))
        pid = fork(lambda: _kill_mid_thaw(counter))
        assert reap(pid) == -signal.SIGKILL
        assert counter.value == 6
        _run_children(lambda: _times(5000, counter.add),
                      lambda: _times(500, counter.add_and_get, 1))
        assert counter.add_and_get(0) == 5506 == counter.value


def _kill_mid_thaw(counter: SharedCounter) -> None:
    """What ``_thaw`` does, stopped by SIGKILL half-way through unfreezing."""
    counter._lock.acquire()
    counter._atomics.store(counter_module._MODE, 0)
    for line in counter_module._STRIPE_AT:
        counter._atomics.fetch_or(line + counter_module._PIN, counter_module._BLOCKED)
    for index in range(counter_module.STRIPES // 2):
        counter._unfreeze(index)
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_add_that_lands_on_a_frozen_stripe_moves_to_pending() -> None:
    """A process that has not yet seen the switch to central adds to its frozen stripe;
    the add must move to pending and the stripe take it back."""
    with SharedCounter() as counter:
        counter.add(7)  # this process's stripe holds 7
        assert counter.add_and_get(0) == 7  # central: every stripe frozen
        # as if this process read the mode hint just before
        counter._atomics.store(counter_module._MODE, 0)
        counter.add(5)
        assert counter.value == 12 and counter.add_and_get(0) == 12
        lane = counter._lane()
        assert lane.word is not None
        assert counter._atomics.load(lane.word) == 7 * 2 + 1  # frozen, nothing left in it


def test_named_counters_share_by_name(backend: str, name: str) -> None:
    first = SharedCounter(10, name, backend=backend)
    second = SharedCounter(99, name, backend=backend, create=False)
    try:
        assert first.created and not second.created and second.value == 10

        def child() -> None:
            other = SharedCounter(0, name, backend=backend, create=False)
            for _ in range(1000):
                other.add()
            other.close()

        _run_children(child, child)
        assert first.value == second.add_and_get(0) == 2010
    finally:
        second.close()
        first.close()
        first.unlink()


def test_a_segment_that_is_not_a_counter_is_refused(name: str, backend: str) -> None:
    shm = ipcfork.SharedMemory(counter_module.SIZE, name, backend=backend)
    shm.buf[24:32] = b"notacntr"
    try:
        with pytest.raises(ipcfork.ObjectCorruptError, match="not a SharedCounter"):
            SharedCounter(0, name, backend=backend)
    finally:
        shm.close()
        shm.unlink()


def test_lock_holder_killed_right_after_taking_the_lock() -> None:
    """The counter's lock is a robust mutex: a holder SIGKILLed at once is released by the
    kernel, and the next holder is told."""
    with SharedCounter() as counter:
        counter.add(3)

        def take_and_die() -> None:
            counter._lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)

        pid = fork(take_and_die)
        assert reap(pid) == -signal.SIGKILL
        assert counter._lock.recoveries == 0
        assert counter.add_and_get(1) == 4  # striped still: goes through the lock
        assert counter._lock.recoveries == 1  # it found the holder dead


def test_fork_per_task_pool_adds_exactly() -> None:
    with SharedCounter() as counter, ipcfork.ForkPool(2) as pool:
        futures = [pool.submit(counter.add, 3) for _ in range(150)]
        for future in futures:
            future.result()
        assert counter.value == 450


def test_subtractions_from_threads_and_processes_while_the_regime_flips() -> None:
    """Threads of one process share a stripe: +1 and -1 from two of them, with another
    process switching the counter between its regimes all along, must still add up."""
    with SharedCounter() as counter:

        def gauge() -> None:
            def up() -> None:
                _times(20_000, counter.add, 1)

            def down() -> None:
                _times(10_000, counter.add, -1)

            _in_threads(up, down)

        rounds = 40

        def flipper() -> None:
            for _ in range(rounds):
                counter.add_and_get(0)  # central (and this process stays pinned)
                _times(counter_module._THAW_AFTER, counter.add, 1)  # unpins, then thaws

        _run_children(gauge, gauge, flipper)
        assert counter.value == 2 * (20_000 - 10_000) + rounds * counter_module._THAW_AFTER


def test_add_and_get_gets_through_a_busy_adder(pipe: Pipe) -> None:
    """Going central must not livelock against a process adding as fast as it can."""
    with SharedCounter() as counter, ipcfork.SharedValue("q", 0) as stop:

        def adder() -> None:
            counter.add()
            pipe.send()
            while not stop.value:
                for _ in range(1000):
                    counter.add()

        pid = fork(adder)
        pipe.recv()
        totals = [counter.add_and_get(1) for _ in range(200)]
        stop.value = 1
        assert reap(pid) == 0
        assert totals == sorted(totals) and len(set(totals)) == 200
        assert counter.value % 1000 == 201 % 1000


def test_threads_that_exit_pinned_do_not_keep_the_counter_central() -> None:
    """Each short-lived thread that calls add_and_get pins its stripe; when it ends, its pin
    goes with it, so a later run of plain adds brings the counter back to stripes."""
    with SharedCounter() as counter:
        for _ in range(50):
            thread = threading.Thread(target=counter.add_and_get, args=(1,))
            thread.start()
            thread.join(30)
        assert counter._pinned == []
        pins = sum(counter._atomics.load(line + counter_module._PIN) & counter_module._COUNT_MASK
                   for line in counter_module._STRIPE_AT)
        assert pins == 0
        for _ in range(2 * counter_module._THAW_AFTER):
            counter.add(1)
        assert counter._atomics.load(counter_module._MODE) == counter_module._STRIPED
        assert counter.value == 50 + 2 * counter_module._THAW_AFTER
