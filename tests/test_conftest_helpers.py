"""The proofs other tests rely on can fail: ``wait_until_blocked`` and
``signal_once_blocked`` (conftest.py) refuse what is not a wait on an IPC object."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Pipe, fork, reap, signal_once_blocked, wait_until_blocked

from ipcfork import MessageQueue, Semaphore


def test_waits_on_each_kind_of_object_are_seen(backend: str) -> None:
    sem = Semaphore(0, backend=backend)
    queue = MessageQueue(backend=backend)
    waiters = [fork(lambda: 0 if sem.acquire(timeout=30) else 1),
               fork(lambda: 0 if queue.get() == "x" else 1)]
    seen = [wait_until_blocked(pid) for pid in waiters]
    if backend == "posix":
        assert seen[0].startswith("futex on /dev/shm/") and seen[1] == "mq_timedreceive"
    else:
        assert seen == ["semtimedop", "msgrcv"]
    sem.release()
    queue.put("x")
    assert [reap(pid) for pid in waiters] == [0, 0]
    queue.close()
    sem.close()


def test_a_sleep_or_a_pipe_read_is_not_an_ipc_wait(pipe: Pipe) -> None:
    children = [fork(time.sleep, 30), fork(pipe.recv)]
    for pid in children:
        with pytest.raises(AssertionError, match="not seen asleep in an IPC wait"):
            wait_until_blocked(pid, timeout=0.3)
        os.kill(pid, signal.SIGKILL)
        assert reap(pid) == -signal.SIGKILL


def test_a_waiter_that_exits_is_reported_at_once() -> None:
    pid = fork(lambda: None)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="exited instead of waiting"):
        wait_until_blocked(pid, timeout=20)
    assert time.monotonic() - start < 15  # not the whole timeout
    assert reap(pid) == 0


def test_no_signal_is_sent_when_the_wait_never_blocks() -> None:
    sem = Semaphore(1)
    seen: list[int] = []
    with (pytest.raises(AssertionError, match="not sent to a wait seen to have begun"),
          signal_once_blocked(signal.SIGUSR1, lambda signum, frame: seen.append(signum),
                              timeout=0.3)):
        assert sem.acquire(timeout=5)  # free: returns at once, never sleeps
    assert seen == []
    sem.release()
    sem.close()
