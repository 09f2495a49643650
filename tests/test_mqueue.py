"""MessageQueue: objects of any size, raw bytes, timeouts, producers that exit early."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import fork, reap, signal_once_blocked, wait_until_blocked

import ipcfork
from ipcfork import MessageQueue
from ipcfork._os.names import POSIX_PREFIX


def _my_spills() -> list[str]:
    """The spill segments in /dev/shm of queues this process created (named by its pid)."""
    return [name for name in os.listdir("/dev/shm")
            if name.startswith(f"{POSIX_PREFIX}{os.getpid()}.spill.")]


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
    elapsed = time.monotonic() - start
    assert elapsed >= 0.1 * 0.9  # it waited: raising at once is not a timeout
    assert elapsed < 10
    assert isinstance(info.value, TimeoutError)
    queue.close()


def test_blocked_get_wakes_on_put(backend: str) -> None:
    queue = MessageQueue(backend=backend)
    # A SysV get with a timeout polls (sleeping between tries): no kernel wait to observe,
    # so the SysV consumer blocks without one (reap's 30 s kill bounds it).
    timeout = 30 if backend == "posix" else None

    def consumer() -> int:
        return 0 if queue.get(timeout=timeout) == "wake" else 1

    child = fork(consumer)
    wait_until_blocked(child)  # the put below wakes a waiter, not a late arrival
    queue.put("wake")
    assert reap(child) == 0
    assert queue.qsize() == 0
    queue.close()


def test_put_on_full_posix_queue_times_out_naming_limits() -> None:
    queue = MessageQueue(max_messages=2, max_message_size=64)
    queue.put(1)
    queue.put(2)
    start = time.monotonic()
    with pytest.raises(ipcfork.QueueFullError, match="max_messages=2"):
        queue.put(3, timeout=0.05)
    assert time.monotonic() - start >= 0.05 * 0.9  # it waited for room before giving up
    with pytest.raises(ipcfork.QueueFullError):
        queue.put_nowait(b"x" * 1000)  # spilled payload is freed when the put fails
    assert _my_spills() == []
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
    assert len(_my_spills()) == 1  # the payload did spill
    queue.close()
    assert _my_spills() == []  # and close freed it (the leak guard checks the rest)


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
    with (signal_once_blocked(signal.SIGUSR1, signal.default_int_handler),
          pytest.raises(KeyboardInterrupt)):
        queue.get()
    queue.put("after")  # the interrupted get took nothing and left the queue usable
    assert queue.get(timeout=5) == "after"
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
    assert len(_my_spills()) == 1
    ref = weakref.ref(queue)
    del queue
    gc.collect()
    assert ref() is None
    assert _my_spills() == []  # the leak guard then checks the queue itself is gone
