"""backend="dask" and ipcfork.dask.forked on a real cluster: LocalCluster(n_workers=2,
processes=True) in a host process that is not our child (see dask_kit), one per module."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
import dask_kit as kit  # noqa: E402

import ipcfork  # noqa: E402
from ipcfork.dask import forked  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    host = kit.ClusterHost()
    settings = {"distributed.scheduler.locks.lease-timeout": f"{kit.LEASE_TIMEOUT}s",
                "distributed.scheduler.locks.lease-validation-interval":
                    f"{kit.LEASE_VALIDATION}s"}
    try:
        with dask.config.set(settings), distributed.Client(host.address) as c:
            yield c
    finally:
        host.stop()


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def test_exact_totals_under_contention(client: Any, tmp_path: Any) -> None:
    counter = ipcfork.SharedCounter(10, name=_unique("total"), backend="dask")
    path = tmp_path / "n"
    path.write_text("0")
    mutex_name = _unique("rmw")
    tasks = [client.submit(kit.add_many, counter.name, 100, pure=False) for _ in range(4)]
    tasks += [client.submit(kit.locked_increments, mutex_name, str(path), 40, pure=False)
              for _ in range(4)]
    assert sum(client.gather(tasks)) == 4 * 100 + 4 * 40
    assert counter.value == 10 + 400
    assert int(path.read_text()) == 160
    assert counter.add_and_get(5) == 415
    assert counter.compare_and_set(415, -1) and not counter.compare_and_set(415, 0)
    assert counter.value == -1
    counter.unlink()
    counter.close()


def test_a_counter_first_made_inside_tasks_does_not_starve_the_workers(client: Any) -> None:
    """More tasks than the cluster's 4 task threads, each the first to open the counter:
    its actor needs a task thread too, so the waiting tasks must leave the pool."""
    import distributed

    name = _unique("made-inside")
    tasks = [client.submit(kit.add_many, name, 5, pure=False) for _ in range(12)]
    distributed.wait(tasks, timeout=30)  # raises TimeoutError on the old deadlock
    assert sum(client.gather(tasks)) == 60
    counter = ipcfork.SharedCounter(name=name, backend="dask")
    assert counter.value == 60
    counter.unlink()
    counter.close()


def test_semaphore_bounds_holders(client: Any) -> None:
    sem = ipcfork.Semaphore(2, _unique("slots"), backend="dask")
    assert isinstance(sem, ipcfork.Semaphore) and sem.max_value == 2
    inside = ipcfork.SharedCounter(name=_unique("inside"), backend="dask")
    tasks = [client.submit(kit.bounded, sem.name, inside.name, 15, pure=False)
             for _ in range(4)]
    assert 1 <= max(client.gather(tasks)) <= 2
    assert inside.value == 0 and sem.value == 2
    # a later handle takes the existing size, whatever value it names
    other = ipcfork.Semaphore(5, sem.name, backend="dask")
    assert other.max_value == 2
    assert sem.acquire() and other.acquire()
    assert not sem.acquire(timeout=0.05) and not other.acquire(blocking=False)
    with pytest.raises(ipcfork.NotOwnerError):
        sem.release(2)
    sem.release()
    other.close()  # gives its lease back
    assert sem.value == 2
    sem.unlink()
    inside.unlink()
    for handle in (sem, inside):
        handle.close()


def test_mutex_interface(client: Any) -> None:
    name = _unique("m")
    mutex = ipcfork.Mutex(name, backend="dask")
    other = ipcfork.Mutex(name, backend="dask", client=client)
    assert isinstance(mutex, ipcfork.Mutex) and mutex.backend == "dask"
    assert mutex.acquire(timeout=5)
    assert mutex.locked() and mutex.held and not other.held
    assert mutex.acquire(blocking=False) is False
    with pytest.raises(ipcfork.DeadlockError):
        mutex.acquire()
    with pytest.raises(ipcfork.NotOwnerError):
        other.release()
    began = time.monotonic()
    assert other.acquire(timeout=0.3) is False
    assert time.monotonic() - began >= 0.3
    with pytest.raises(ipcfork.BufferInUseError):
        mutex.close()
    assert not mutex.previous_owner_died and mutex.dead_owner_pid is None
    mutex.release()
    with other:
        assert other.held
    assert not mutex.locked()
    mutex.unlink()
    for handle in (mutex, other):
        handle.close()
    with pytest.raises(ipcfork.ObjectClosedError):
        mutex.acquire()


def test_queue(client: Any) -> None:
    name = _unique("q")
    queue = ipcfork.MessageQueue(name, backend="dask", max_messages=2)
    peer = ipcfork.MessageQueue(name, backend="dask")
    queue.put({"job": 1})
    queue.put_nowait([2])
    with pytest.raises(ipcfork.QueueFullError):
        queue.put(3, timeout=0.05)
    assert peer.qsize() == 2
    assert peer.get(timeout=5) == {"job": 1} and peer.get_nowait() == [2]
    with pytest.raises(ipcfork.QueueEmptyError):
        peer.get(timeout=0.05)
    raw = ipcfork.MessageQueue(_unique("raw"), backend="dask", raw=True, max_message_size=4)
    raw.put(b"abcd")
    assert raw.get() == b"abcd"
    with pytest.raises(ipcfork.LimitExceededError):
        raw.put(b"abcde")
    with pytest.raises(ipcfork.InvalidArgumentError):
        raw.put("text")
    for handle in (queue, raw):
        handle.unlink()
    for handle in (queue, peer, raw):
        handle.close()


def test_bad_input(client: Any) -> None:
    for make in (lambda: ipcfork.Mutex(backend="dask"),
                 lambda: ipcfork.Semaphore(1, backend="dask"),
                 lambda: ipcfork.SharedCounter(backend="dask"),
                 lambda: ipcfork.MessageQueue(backend="dask")):
        with pytest.raises(ipcfork.InvalidArgumentError, match="needs name="):
            make()
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.Mutex("", backend="dask")
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.Mutex(b"bytes", backend="dask")  # type: ignore[arg-type]
    with pytest.raises(ipcfork.InvalidArgumentError, match="exclusive"):
        ipcfork.Mutex("x", backend="dask", exclusive=True)
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.Mutex("x", backend="dask", client="tcp://nowhere")
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.Semaphore(0, "x", backend="dask")
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.SharedCounter(2**63, "x", backend="dask")
    with pytest.raises(ipcfork.InvalidArgumentError, match="backend"):
        ipcfork.Mutex("x", backend="cluster")
    mutex = ipcfork.Mutex(_unique("bad"), backend="dask", create=True)  # defaults pass
    with pytest.raises(ipcfork.InvalidArgumentError):
        mutex.acquire(timeout=-1)
    with pytest.raises(ipcfork.InvalidArgumentError):
        mutex.acquire(blocking=False, timeout=1)
    mutex.close()
    for bad in (lambda: forked(42), lambda: forked(len, timeout=-1),  # type: ignore[arg-type]
                lambda: forked(len, timeout=0)):
        with pytest.raises(ipcfork.InvalidArgumentError):
            bad()


@pytest.mark.timeout(90)
def test_killed_holder_loses_the_mutex_within_the_lease(client: Any) -> None:
    name = _unique("victim-lock")
    victim = kit.start_worker(client.scheduler.address, _unique("victim"))
    try:
        client.wait_for_workers(3, timeout=30)
        address = next(a for a, w in client.scheduler_info()["workers"].items()
                       if str(w.get("name")).startswith("victim"))
        held = client.submit(kit.hold_forever, name, workers=[address],
                             allow_other_workers=False, pure=False)
        mutex = ipcfork.Mutex(name, backend="dask")
        deadline = time.monotonic() + 30
        while not mutex.locked():  # a condition polled, not a sleep: the task took it
            assert time.monotonic() < deadline, "the victim never took the mutex"
            threading.Event().wait(0.01)
        assert not mutex.acquire(blocking=False)
        # A waiter already queued in the scheduler when the holder dies is the one woken.
        waiter = ipcfork.Mutex(name, backend="dask")
        outcome: list[float] = []

        def wait_for_it() -> None:
            if waiter.acquire(timeout=30):
                outcome.append(time.monotonic())
                waiter.release()  # by the thread that holds it

        thread = threading.Thread(target=wait_for_it)
        thread.start()
        key = f"ipcfork-mutex-{name}"
        while client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.extensions["semaphores"]
                .metrics["pending"][key]) < 1:  # proof that the wait has begun
            assert time.monotonic() < deadline, "the waiter never queued"
            threading.Event().wait(0.01)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert victim.wait(10) == -signal.SIGKILL
        thread.join(40)
        assert outcome, "the waiter never got the mutex"
        waited = outcome[0] - killed
        # Not at once (the lease was refreshed a moment ago; generous for a late refresh
        # under load) ...
        assert waited >= 0.2 * kit.LEASE_TIMEOUT
        # ... and no later than the lease plus a validation round plus slack.
        assert waited <= kit.LEASE_TIMEOUT + kit.LEASE_VALIDATION + 3.0
        waiter.close()
        assert not mutex.previous_owner_died  # not knowable on dask
        held.cancel()
        mutex.unlink()
        mutex.close()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_forked_segfault_fails_the_task_not_the_worker(client: Any) -> None:
    address = next(iter(client.scheduler_info()["workers"]))
    before = client.submit(kit.my_pid, workers=[address], pure=False).result()
    crash = client.submit(forked(kit.segfault), workers=[address], pure=False)
    with pytest.raises(ipcfork.ChildCrashedError, match="SIGSEGV"):
        crash.result()
    exited = client.submit(forked(kit.exit_hard), 3, workers=[address], pure=False)
    with pytest.raises(ipcfork.ChildCrashedError):
        exited.result()
    after = client.submit(kit.my_pid, workers=[address], pure=False).result()
    assert after == before  # the same worker process lives on
    assert client.submit(forked(kit.square), 7, pure=False).result() == 49
    assert client.submit(forked(kit.my_pid), workers=[address], pure=False).result() != before


def test_forked_timeout_and_errors(client: Any) -> None:
    began = time.monotonic()
    slow = client.submit(forked(kit.sleep_for, timeout=0.3), 30, pure=False)
    with pytest.raises(ipcfork.TaskTimeoutError):
        slow.result()
    assert time.monotonic() - began < 10
    with pytest.raises(ValueError, match="bad item 3"):
        client.submit(forked(kit.fail_on), 3, pure=False).result()
    with pytest.raises(ipcfork.InvalidArgumentError, match="forked"):
        client.submit(forked(kit.use_dask_inside), pure=False).result()


def test_forked_keeps_a_bounded_number_of_pools(client: Any) -> None:
    worker = sorted(client.scheduler_info()["workers"])[0]
    for n in range(12):  # a pool per timeout: 12 timeouts, one worker process
        task = client.submit(forked(kit.square, timeout=10.0 + n), n, workers=[worker],
                             pure=False)
        assert task.result() == n * n
    kept, limit = client.submit(kit.forked_pools, workers=[worker], pure=False).result()
    assert 1 <= kept <= limit < 12


def run_batch(executor: concurrent.futures.Executor) -> tuple[int, list[int], str]:
    """Written once against the Executor interface: no dask, no ipcfork in here."""
    total = sum(executor.map(kit.square, range(20)))
    futures = [executor.submit(kit.fail_on, x) for x in range(5)]
    concurrent.futures.wait(futures)
    good = sorted(f.result() for f in futures if f.exception() is None)
    bad = next(str(f.exception()) for f in futures if f.exception() is not None)
    return total, good, bad


def test_same_code_on_forkpool_and_dask_executor(client: Any) -> None:
    expected = (sum(x * x for x in range(20)), [0, 1, 2, 4], "bad item 3")
    # This process runs the dask client's IO loop thread, which ForkPool would rightly warn
    # about; the children never touch it.
    with ipcfork.ForkPool(2, fork_safety_checks=False) as pool:
        assert run_batch(pool) == expected
    with client.get_executor(pure=False) as executor:
        assert run_batch(executor) == expected


def test_race_across_the_cluster(client: Any) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "ipcfork", "race", "--cluster", client.scheduler.address,
               "--workers", "2", "-k", "40"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "counter: 2 workers x 40 iterations, window 0 (none)"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {"none", "mutex-dask", "counter-dask"}
    for guard in ("mutex-dask", "counter-dask"):
        assert rows[guard][1:4] == ["80", "80", "0"] and rows[guard][-1] == "exact"
    assert "Every guarded run was exact." in done.stdout
    wrong = subprocess.run([*command, "--guard", "mutex-posix"], capture_output=True,
                           text=True, timeout=50)
    assert wrong.returncode == 2 and "--cluster runs the guards" in wrong.stderr


@pytest.mark.timeout(120)
def test_an_interrupted_acquire_leaves_no_lease_behind() -> None:
    """Ctrl-C (here: an exception from a signal handler) while acquire waits in the
    scheduler: when the holder then releases, the interrupted request may be granted a
    lease nobody holds.  It must come back within moments, not after the lease timeout
    (60 s on this cluster, as in a long-hold deployment)."""
    import signal
    import threading

    host = kit.ClusterHost(lease_timeout="60s")
    try:
        with distributed.Client(host.address) as c:
            name = _unique("interrupted")
            key = f"ipcfork-mutex-{name}"
            holder = ipcfork.Mutex(name, backend="dask", client=c)
            waiter = ipcfork.Mutex(name, backend="dask", client=c)
            assert holder.acquire(timeout=10)

            def pending() -> int:
                return int(c.run_on_scheduler(
                    lambda dask_scheduler: dask_scheduler.extensions["semaphores"]
                    .metrics["pending"][key]))

            class Interrupted(Exception):
                pass

            def interrupt(signum: int, frame: object) -> None:
                raise Interrupted

            def interrupt_once_waiting() -> None:
                deadline = time.monotonic() + 30
                while pending() < 1 and time.monotonic() < deadline:
                    threading.Event().wait(0.01)  # polling the scheduler, bounded
                os.kill(os.getpid(), signal.SIGUSR1)  # the wait has begun: interrupt it

            previous = signal.signal(signal.SIGUSR1, interrupt)
            thread = threading.Thread(target=interrupt_once_waiting)
            thread.start()
            try:
                with pytest.raises(Interrupted):
                    waiter.acquire(timeout=30)
            finally:
                thread.join()
                signal.signal(signal.SIGUSR1, previous)
            holder.release()
            third = ipcfork.Mutex(name, backend="dask", client=c)
            assert third.acquire(timeout=20)  # the lease timeout is 60 s
            third.release()
            for handle in (holder, waiter, third):
                handle.close()
    finally:
        host.stop()


def test_handles_of_an_unlinked_queue_or_semaphore_say_so(client: Any) -> None:
    name = _unique("gone")
    queue = ipcfork.MessageQueue(name, backend="dask")
    other = ipcfork.MessageQueue(name, backend="dask")
    queue.put("lost with the queue")
    queue.unlink()
    with pytest.raises(ipcfork.ObjectNotFoundError, match="was unlinked"):
        other.put(2, timeout=1)
    with pytest.raises(ipcfork.ObjectNotFoundError, match="was unlinked"):
        other.get(timeout=1)
    semaphore = ipcfork.Semaphore(2, name, backend="dask")
    peer = ipcfork.Semaphore(2, name, backend="dask")
    semaphore.unlink()
    with pytest.raises(ipcfork.ObjectNotFoundError, match="was unlinked"):
        peer.acquire(timeout=1)
    for handle in (queue, other, semaphore, peer):
        handle.close()
