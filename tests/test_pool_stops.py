"""The manager's hardest paths: a child that outlives its SIGKILL, and Ctrl-C while the main
thread is inside the pool's first ``submit``."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest

import ipcfork
from ipcfork import TaskTimeoutError, testing
from ipcfork.pool import executor, manager

_POLL = {"x86_64": 7}  # poll(2); its third argument is the timeout, -1 for none
_FOREVER = 0xFFFFFFFF


def _manager_thread() -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == "ipcfork-pool"]
    return thread


def _asleep_without_deadline(tid: int) -> bool:
    """Thread ``tid`` is blocked in poll(2) with no timeout: nothing will wake it but an
    event.  (A manager that re-sends SIGKILL every round polls with a zero timeout.)"""
    with open(f"/proc/self/task/{tid}/stat") as stat:
        text = stat.read()
    with open(f"/proc/self/task/{tid}/syscall") as current:
        fields = current.read().split()
    state = text[text.rindex(")") + 2]
    return (state == "S" and fields[0] == str(_POLL[os.uname().machine])
            and int(fields[3], 16) & _FOREVER == _FOREVER)


@pytest.mark.skipif(os.uname().machine not in _POLL, reason="poll(2) number known for x86_64")
def test_after_the_grace_period_sigkill_is_sent_once_and_the_manager_sleeps() -> None:
    # The zygote delivers our signals to the task's child.  Stopped, it cannot: the child
    # outlives its SIGKILL as one in uninterruptible sleep would.  The manager must send one
    # KILL and then sleep until an exit, not spin re-sending it (100% CPU, and in zygote mode
    # an outbox that grows without bound).
    timeout, grace = 0.2, 0.2
    pool = ipcfork.ForkPool(1, zygote=True, timeout=timeout, grace=grace)
    (zygote,) = testing.children()
    try:
        submitted = time.monotonic()
        future = pool.submit(time.sleep, 60)
        while future.record.pid is None:  # the zygote reported the child it forked
            time.sleep(0.001)
        os.kill(zygote, signal.SIGSTOP)
        tid = _manager_thread().native_id
        assert tid is not None
        deadline = time.monotonic() + 20
        while not _asleep_without_deadline(tid):
            assert time.monotonic() < deadline, "the manager never slept after its SIGKILL"
            time.sleep(0.001)  # a poll interval: the loop checks the state itself
        assert time.monotonic() - submitted >= timeout + grace  # TERM, grace, then KILL
        with pytest.raises(TaskTimeoutError):
            os.kill(zygote, signal.SIGCONT)  # the zygote now delivers TERM and KILL
            future.result(timeout=30)
    finally:
        os.kill(zygote, signal.SIGCONT)
        pool.shutdown()


def _submit_code() -> set[Any]:
    return {executor.ForkPool.submit.__code__, manager.Manager.submit.__code__}


def future_done_or_absent(pool: ipcfork.ForkPool) -> bool:
    """Every task the pool knows of has ended (or none was queued)."""
    return not pool._manager.pending and not pool._manager.dispatcher.in_flight() \
        if pool._manager.dispatcher is not None else True


def test_ctrl_c_at_any_line_of_the_first_submit_stops_the_pool_cleanly() -> None:
    # SIGINT raised at each line of the first submit in turn, with the pool's handler in
    # place: the handler must neither deadlock on the pool's lock held by the interrupted
    # code nor fail joining a manager that has not run yet.  KeyboardInterrupt comes out,
    # the pool is stopped, and nothing is left behind.
    codes = _submit_code()
    line = 0
    while True:
        line += 1
        pool = ipcfork.ForkPool(2)
        seen = 0
        raised = False

        def trace(frame: FrameType, event: str, arg: Any, at: int = line) -> Any:
            nonlocal seen, raised
            if frame.f_code not in codes:
                return None
            if event == "line":
                seen += 1
                if seen == at and not raised:
                    raised = True
                    signal.raise_signal(signal.SIGINT)
            return trace

        interrupted = False
        sys.settrace(trace)
        try:
            future = pool.submit(time.sleep, 30)
            sys.settrace(None)
            if raised:  # the handler may run just after submit returned
                future.result(timeout=30)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        assert raised == interrupted, f"line {line}: the signal was raised: {raised}"
        if raised:  # the handler stopped the pool and put the default handler back
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert future_done_or_absent(pool)
        pool.shutdown()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert testing.children() == []
        if not raised:
            break  # every line of submit has had its signal
    assert line > 5  # the loop did walk through submit
