"""The manager's hardest paths: a child that outlives its SIGKILL, and Ctrl-C while the main
thread is inside the pool's first ``submit``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from types import FrameType
from typing import Any

import pytest

import ipcfork
from ipcfork import ChildCrashedError, TaskTimeoutError, testing
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
        _wait_running(future)  # the zygote reported the child it forked
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


class _SigintAtLine:
    """A trace function (for ``sys.settrace``) that raises SIGINT once, at the ``at``-th line
    run in any of ``codes``; ``raised_at`` says when (None until it has)."""

    def __init__(self, codes: set[Any], at: int) -> None:
        self.codes, self.at, self.seen = codes, at, 0
        self.raised_at: float | None = None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code not in self.codes:
            return None
        if event == "line":
            self.seen += 1
            if self.seen == self.at and self.raised_at is None:
                self.raised_at = time.monotonic()
                signal.raise_signal(signal.SIGINT)
        return self


def _wait_running(future: Any) -> int:
    """The pid of the process running ``future``'s task, once it runs."""
    while future.record.pid is None:
        time.sleep(0.001)
    return int(future.record.pid)


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
        trace = _SigintAtLine(codes, line)
        interrupted = False
        sys.settrace(trace)
        try:
            future = pool.submit(time.sleep, 30)
            sys.settrace(None)
            if trace.raised_at is not None:  # the handler may run just after submit returned
                future.result(timeout=30)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        raised = trace.raised_at is not None
        assert raised == interrupted, f"line {line}: the signal was raised: {raised}"
        if raised:  # the handler stopped the pool and put the default handler back
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert future_done_or_absent(pool)
        else:  # submit ran whole: end its 30 s task rather than wait for it
            os.kill(_wait_running(future), signal.SIGKILL)
        pool.shutdown()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert testing.children() == []
        if not raised:
            break  # every line of submit has had its signal
    assert line > 5  # the loop did walk through submit


@pytest.mark.parametrize("mode", [{}, {"tasks_per_child": None}, {"zygote": True}],
                         ids=["per-task", "persistent", "zygote"])
def test_ctrl_c_at_any_line_of_a_wait_on_a_future_stops_at_once(mode: dict[str, Any]) -> None:
    # SIGINT at each line of Future.exception() and the Condition code under it, in turn.
    # At several of them the main thread holds the future's own lock, which the manager
    # needs to resolve that future, while the handler (in that same thread) waits for the
    # manager: the stop used to hang until the handler's bound (grace + 5 s).  Now the
    # handler resolves the futures itself, and the stop takes no longer than the kill.
    codes = {Future.exception.__code__, threading.Condition.wait.__code__,
             threading.Condition.__enter__.__code__, threading.Condition.__exit__.__code__}
    line = 0
    while True:
        line += 1
        pool = ipcfork.ForkPool(1, grace=1.0, **mode)
        future = pool.submit(time.sleep, 30)
        pid = _wait_running(future)  # running: nothing but a stop resolves it now
        trace = _SigintAtLine(codes, line)
        sys.settrace(trace)
        try:
            future.exception(timeout=0.05)  # past the last line: TimeoutError, no signal
        except (KeyboardInterrupt, RuntimeError) as exc:
            # CPython's own flaw: Condition.wait releases the lock one line before the try
            # whose finally takes it back, so an exception in between makes the ``with``
            # block's exit fail to release a lock it no longer holds.  Not the pool's.
            assert not isinstance(exc, RuntimeError) or "un-acquired lock" in str(exc)
            assert trace.raised_at is not None
            assert time.monotonic() - trace.raised_at < 3.0, f"line {line}: the stop hung"
            # Resolved before the KeyboardInterrupt came out: its process was terminated.
            assert future.done() and isinstance(future.exception(), ChildCrashedError)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        except TimeoutError:
            assert trace.raised_at is None
            os.kill(pid, signal.SIGKILL)
        finally:
            sys.settrace(None)
        pool.shutdown()
        assert testing.children() == []
        if trace.raised_at is None:
            break  # every line has had its signal
    assert line > 10  # the loop did walk through the wait


MODES = [pytest.param({}, id="per-task"), pytest.param({"tasks_per_child": None},
                                                         id="persistent"),
         pytest.param({"zygote": True}, id="zygote")]


@contextlib.contextmanager
def _fork_safety_warnings_are_errors() -> Iterator[None]:
    """A thread of the user's runs ("busy-elsewhere") and ForkSafetyWarning is an error."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="busy-elsewhere")
    other.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ipcfork.ForkSafetyWarning)
            yield
    finally:
        stop.set()
        other.join()


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_safety_warning_made_an_error_fails_one_task_not_the_pool(
        mode: dict[str, Any]) -> None:
    # The manager thread has no caller to raise to: an escaping warning once killed it
    # and left the task it was forking for RUNNING for ever.
    with _fork_safety_warnings_are_errors():
        if mode.get("zygote"):  # the zygote is forked as the pool starts: it raises
            with pytest.raises(ipcfork.ForkSafetyWarning, match="busy-elsewhere"):
                ipcfork.ForkPool(1, **mode)
            return
        with ipcfork.ForkPool(1, **mode) as pool:
            with pytest.raises(ipcfork.ForkSafetyWarning, match="busy-elsewhere"):
                pool.submit(abs, -1).result(timeout=30)
            assert pool.submit(abs, -2).result(timeout=30) == 2  # warned once: it runs


def _die_by(signum: int) -> None:
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("mode", MODES)
def test_a_real_time_signal_names_itself_and_the_pool_lives(mode: dict[str, Any]) -> None:
    signum = signal.SIGRTMIN + 6  # no name in signal.Signals: naming it once killed the manager
    with ipcfork.ForkPool(1, **mode) as pool:
        with pytest.raises(ipcfork.ChildCrashedError, match=r"SIGRTMIN\+6") as crash:
            pool.submit(_die_by, signum).result(timeout=30)
        assert crash.value.signal == signum
        assert pool.submit(abs, -3).result(timeout=30) == 3


def test_a_done_callback_raising_system_exit_leaves_every_other_future_resolved(
        caplog: pytest.LogCaptureFixture) -> None:
    with ipcfork.ForkPool(2) as pool:
        futures = [pool.submit(abs, -i) for i in range(8)]
        futures[3].add_done_callback(lambda f: sys.exit(3))
        assert [f.result(timeout=30) for f in futures] == list(range(8))
        assert pool.submit(abs, -9).result(timeout=30) == 9
    assert any("done-callback of task" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", [{"tasks_per_child": None}, {"zygote": True}],
                         ids=["persistent", "zygote"])
def test_shutdown_does_not_wait_on_a_pipe_another_pool_inherited(mode: dict[str, Any]) -> None:
    # Pool B's processes, forked later, hold copies of pool A's pipes: an EOF alone never
    # reaches A's worker (or zygote), and A's shutdown once hung until B was shut down.
    first = ipcfork.ForkPool(1, **mode)
    assert first.submit(abs, -1).result(timeout=30) == 1  # its worker (or zygote) runs
    second = ipcfork.ForkPool(1, **mode)
    try:
        assert second.submit(abs, -2).result(timeout=30) == 2
        first.shutdown()  # bounded by the test's timeout: it once blocked here
        assert second.submit(abs, -3).result(timeout=30) == 3
    finally:
        second.shutdown()
        first.shutdown()


def test_a_zygote_pool_made_in_a_thread_that_ends_keeps_its_zygote() -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked ends: the zygote is forked by
    # the manager thread, which lives as long as the pool.  Made in a thread that then
    # ended, it once took its zygote and the task running there along.
    r, w = os.pipe()
    made: list[Any] = []

    def make() -> None:
        pool = ipcfork.ForkPool(1, zygote=True)
        made.append((pool, testing.children(), pool.submit(os.read, r, 1)))

    maker = threading.Thread(target=make)
    maker.start()
    tid = maker.native_id
    maker.join()
    (pool, zygote, future), = made
    try:
        while os.path.exists(f"/proc/self/task/{tid}"):  # the OS thread is gone too
            time.sleep(0.001)
        os.write(w, b"x")
        assert future.result(timeout=30) == b"x"  # the task lived on, in the same zygote
        assert testing.children() == zygote
    finally:
        pool.shutdown()
        os.close(r)
        os.close(w)


def test_a_pool_that_fails_to_start_releases_everything() -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    with _fork_safety_warnings_are_errors(), pytest.raises(ipcfork.ForkSafetyWarning):
        ipcfork.ForkPool(1, zygote=True)
    assert sorted(os.listdir("/proc/self/fd")) == before  # the autouse check sees IPC


@pytest.mark.parametrize("bad", ["2", float("nan"), float("inf"), True])
def test_max_load_must_be_a_finite_number(bad: Any) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="max_load"):
        ipcfork.ForkPool(1, max_load=bad)


_AT_EXIT = """
import os, sys, ipcfork
out = sys.argv[1]
def touch(i):
    open(os.path.join(out, str(i)), "w").close()
pool = ipcfork.ForkPool(1, tasks_per_child=None if sys.argv[2] == "persistent" else 1)
for i in range(4):
    pool.submit(touch, i)
if sys.argv[3] == "drop":
    del pool          # dropped without a shutdown: its work still finishes at exit
else:
    pool.shutdown(wait=False)
"""


@pytest.mark.parametrize("how", ["drop", "no-wait"])
@pytest.mark.parametrize("mode", ["per-task", "persistent"])
def test_work_submitted_before_exit_is_finished_as_concurrent_futures_does(
        tmp_path: Any, how: str, mode: str) -> None:
    run = subprocess.run([sys.executable, "-c", _AT_EXIT, str(tmp_path), mode, how],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2", "3"]
