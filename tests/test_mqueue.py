"""MessageQueue: objects of any size, raw bytes, timeouts, producers that exit early."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Pipe, fork, reap

import ipcfork
from ipcfork import MessageQueue


def test_objects_round_trip(backend: str) -> None:
    queue = MessageQueue(backend=backend)
    payloads = [None, 1, "text", {"a": [1, 2]}, b"\x00\xff" * 10]
    for item in payloads:
        queue.put(item)
    assert queue.qsize() == len(payloads)
    assert [queue.get(timeout=5) for _ in payloads] == payloads
    queue.close()


@pytest.mark.parametrize("size", [8191, 8192, 100_000, 3 * 1024 * 1024])
def test_large_objects_are_byte_exact_across_processes(backend: str, size: int) -> None:
    queue = MessageQueue(backend=backend)
    payload = os.urandom(size)

    def producer() -> None:
        queue.put(payload)

    assert reap(fork(producer)) == 0  # the producer exits before the consumer reads
    assert queue.get(timeout=10) == payload
    queue.close()


def test_producer_exit_before_consumer_drains(backend: str) -> None:
    queue = MessageQueue(backend=backend)

    def producer() -> None:
        for i in range(5):
            queue.put(i)

    assert reap(fork(producer)) == 0
    assert [queue.get_nowait() for _ in range(5)] == list(range(5))
    with pytest.raises(ipcfork.QueueEmptyError):
        queue.get_nowait()
    queue.close()


def test_get_timeout(backend: str) -> None:
    queue = MessageQueue(backend=backend)
    start = time.monotonic()
    with pytest.raises(ipcfork.QueueEmptyError) as info:
        queue.get(timeout=0.1)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, TimeoutError)
    queue.close()


def test_blocked_get_wakes_on_put(backend: str, pipe: Pipe) -> None:
    queue = MessageQueue(backend=backend)

    def consumer() -> int:
        pipe.send()
        return 0 if queue.get(timeout=30) == "wake" else 1

    child = fork(consumer)
    pipe.recv()
    queue.put("wake")
    assert reap(child) == 0
    queue.close()


def test_put_on_full_posix_queue_times_out_naming_limits() -> None:
    queue = MessageQueue(max_messages=2, max_message_size=64)
    queue.put(1)
    queue.put(2)
    with pytest.raises(ipcfork.QueueFullError, match="max_messages=2"):
        queue.put(3, timeout=0.05)
    with pytest.raises(ipcfork.QueueFullError):
        queue.put_nowait(b"x" * 1000)  # spilled payload is freed when the put fails
    assert [queue.get_nowait(), queue.get_nowait()] == [1, 2]
    queue.close()


def test_raw_mode_sends_bytes_and_names_the_limit(backend: str) -> None:
    queue = MessageQueue(backend=backend, raw=True)
    queue.put(b"\x00raw\xff")
    assert queue.get(timeout=5) == b"\x00raw\xff"
    with pytest.raises(ipcfork.LimitExceededError, match="8192"):
        queue.put(b"x" * 10_000)
    with pytest.raises(ipcfork.InvalidArgumentError):
        queue.put("not bytes")
    queue.close()


def test_undelivered_spills_are_freed_on_close(backend: str) -> None:
    queue = MessageQueue(backend=backend)
    queue.put(b"y" * 50_000)
    queue.close()  # the leak guard fails the test if the spill stayed in /dev/shm


def test_named_queue_between_handles(backend: str, name: str) -> None:
    first = MessageQueue(name, backend=backend)
    second = MessageQueue(name, backend=backend, create=False)
    first.put({"k": "v"})
    assert second.get(timeout=5) == {"k": "v"}
    second.close()
    first.unlink()
    first.close()


def test_keyboard_interrupt_ends_blocking_get(backend: str) -> None:
    queue = MessageQueue(backend=backend)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            queue.get()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    queue.close()


def test_bad_sizes_name_the_limit() -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="max_messages"):
        MessageQueue(max_messages=0)
    with pytest.raises(ipcfork.InvalidArgumentError, match="max_message_size"):
        MessageQueue(max_message_size=10**9)
    with pytest.raises(ipcfork.InvalidArgumentError, match="SysV"):
        MessageQueue(backend="sysv", max_messages=3)


def test_dropped_anonymous_queue_is_collected_and_removed(backend: str) -> None:
    import gc
    import weakref

    queue = MessageQueue(backend=backend)
    queue.put(b"z" * 50_000)  # a spill that must be freed with it
    ref = weakref.ref(queue)
    del queue
    gc.collect()
    assert ref() is None  # the leak guard then checks the queue and its spill are gone
