"""Autouse guards around every test: no leaked IPC object, no child left (live or zombie),
signal handlers restored; plus the ``backend`` fixture, fork helpers, and
``wait_until_blocked`` / ``signal_once_blocked``, which prove through /proc that a wait has
begun before a test wakes or interrupts it."""

from __future__ import annotations

import contextlib
import os
import platform
import select
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcfork import testing

# SIGALRM is left out: pytest-timeout owns it around each test.
_WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGHUP)

# A private registry for the test run, so tests never touch the user's records.
os.environ["IPCFORK_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ipcfork-tests-")


@pytest.fixture(autouse=True)
def _no_leaks_no_children() -> Iterator[None]:
    handlers = {sig: signal.getsignal(sig) for sig in _WATCHED_SIGNALS}
    before = testing.snapshot()
    yield
    import gc

    gc.collect()  # run finalizers of objects the test dropped
    left = testing.children()
    for pid in left:  # do not let one test's stray child poison the next
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    leaked = testing.snapshot() - before
    changed = [sig for sig, h in handlers.items() if signal.getsignal(sig) != h]
    for sig in changed:
        signal.signal(sig, handlers[sig])
    assert not left, f"test left child processes: {left}"
    assert not leaked, f"test leaked IPC objects: {leaked.describe()}"
    assert not changed, f"test changed signal handlers: {changed}"


@pytest.fixture(params=["posix", "sysv"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fork(target: Callable[..., Any], *args: Any) -> int:
    """Fork a child running ``target(*args)``; its exit status is the verdict."""
    return testing.fork_call(target, *args)


def reap(pid: int, timeout: float = 30.0) -> int:
    """Wait for child ``pid`` (killing it after ``timeout`` s) and return its exit status,
    or ``-signal`` if a signal ended it."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child {pid} did not finish within {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# The system calls a thread sleeps in while it waits on an IPC object, by machine: a POSIX
# semaphore waits in futex (sem_wait, sem_timedwait), a SysV one in semtimedop (glibc's semop
# calls it too), queues in msgrcv/msgsnd (SysV) or mq_timedreceive/mq_timedsend (POSIX).
_WAIT_SYSCALLS: dict[str, dict[int, str]] = {
    "x86_64": {202: "futex", 65: "semop", 220: "semtimedop", 69: "msgsnd", 70: "msgrcv",
               242: "mq_timedsend", 243: "mq_timedreceive"},
    "aarch64": {98: "futex", 193: "semop", 192: "semtimedop", 189: "msgsnd", 188: "msgrcv",
                182: "mq_timedsend", 183: "mq_timedreceive"},
}


def _mapping_of(tid: int, address: int) -> str | None:
    """The file mapped at ``address`` in the process of thread ``tid`` (None: anonymous)."""
    with open(f"/proc/{tid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(edge, 16) for edge in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def blocked_in(tid: int) -> str | None:
    """The IPC wait thread or process ``tid`` is asleep in right now (for example
    ``"semtimedop"`` or ``"futex on /dev/shm/sem.x"``), or None if it is not asleep in one.

    A futex counts only on shared memory (a POSIX semaphore, a SysV segment): the futexes of
    the GIL or of a private lock live in private memory and are not an IPC wait.  Raises
    AssertionError if ``tid`` has exited.
    """
    syscalls = _WAIT_SYSCALLS.get(platform.machine())
    if syscalls is None:
        raise AssertionError(f"no table of wait system calls for {platform.machine()}")
    try:
        with open(f"/proc/{tid}/stat") as stat:
            text = stat.read()
        with open(f"/proc/{tid}/syscall") as current:
            fields = current.read().split()
    except FileNotFoundError:
        raise AssertionError(f"{tid} exited instead of waiting") from None
    except PermissionError as exc:  # /proc/N/syscall needs ptrace access to N
        raise AssertionError(f"cannot look into {tid} ({exc}): run the tests as root or "
                             "with kernel.yama.ptrace_scope=0") from None
    state = text[text.rindex(")") + 2]
    if state in "ZX":
        raise AssertionError(f"{tid} exited instead of waiting")
    if state != "S" or not fields[0].isdigit():  # running, or not inside a system call
        return None
    name = syscalls.get(int(fields[0]))
    if name != "futex":
        return name
    path = _mapping_of(tid, int(fields[1], 16))
    if path is None or not path.startswith(("/dev/shm/", "/SYSV")):
        return None
    return f"futex on {path}"


def wait_until_blocked(tid: int, timeout: float = 10.0) -> str:
    """Poll /proc until thread or process ``tid`` is asleep in an IPC wait (see
    :func:`blocked_in`) and return what it waits in; AssertionError after ``timeout`` s.

    Tests call this before they release, signal or kill what the waiter waits for, so a
    waiter that never blocked (or had not begun yet) cannot pass for one that woke up.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = blocked_in(tid)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{tid} was not seen asleep in an IPC wait within {timeout} s")
        time.sleep(0.001)  # a poll interval, not a guess: the loop checks the state itself


@contextlib.contextmanager
def signal_once_blocked(signum: int, handler: Any, timeout: float = 10.0) -> Iterator[None]:
    """Run the block with ``handler`` installed for ``signum`` while a forked watcher waits
    until this process is asleep in an IPC wait (:func:`wait_until_blocked`) and only then
    sends it ``signum``.

    On leaving, the watcher is reaped first and the previous handler restored after, so the
    signal can never land on a restored handler; then AssertionError unless the watcher saw
    the wait begin and sent the signal.  A watcher that never sees the wait sends nothing.
    """
    target = os.getpid()

    def watch() -> None:
        wait_until_blocked(target, timeout)
        os.kill(target, signum)

    previous = signal.signal(signum, handler)
    try:
        watcher = fork(watch)
        try:
            yield
        finally:
            status = reap(watcher, timeout + 30)
    finally:
        signal.signal(signum, previous)
    assert status == 0, "the signal was not sent to a wait seen to have begun (see stderr)"


class Pipe:
    """A one-way pipe to pass single bytes between parent and child as events."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, byte: bytes = b"x") -> None:
        os.write(self.w, byte)

    def recv(self, timeout: float = 30.0) -> bytes:
        ready, _, _ = select.select([self.r], [], [], timeout)
        if not ready:
            raise AssertionError(f"no event within {timeout} s")
        return os.read(self.r, 1)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@pytest.fixture
def pipe2() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@pytest.fixture
def keyfile(tmp_path: Any) -> str:
    """An existing file whose path names SysV objects (via ftok) in a test."""
    path = tmp_path / "key"
    path.write_text("ipcfork test key\n")
    return str(path)


@pytest.fixture
def name(backend: str) -> Iterator[str]:
    """A fresh name for a named object of ``backend``: a POSIX name or an ftok path.

    The ftok file lives in a directory other users can reach, so tests that plant objects
    as another uid can use it too.
    """
    if backend == "posix":
        import secrets

        yield f"/ipcfork-test.{os.getpid()}.{secrets.token_hex(4)}"
        return
    directory = tempfile.mkdtemp(prefix="ipcfork-key-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "ftok-key")
    with open(path, "w"):
        pass
    os.chmod(path, 0o644)
    yield path
    os.unlink(path)
    os.rmdir(directory)


def interrupt_repeatedly(body: Callable[[], None], after_each: Callable[[int], None], *,
                         interval: float, times: int = 200) -> None:
    """Run ``body`` in a loop, interrupted ``times`` times by a SIGALRM handler that raises
    every ``interval`` seconds; call ``after_each(n)`` after the n-th interruption.

    One interruption per arming: on a busy machine a second SIGALRM may already be pending
    when the first is handled, and it must not fire outside the guarded loop; and the timer
    is armed inside the ``try``, so an interruption can only land where it is caught.
    """

    class Tick(Exception):
        pass

    armed = [False]

    def on_alarm(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise Tick

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for interruption in range(1, times + 1):
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, interval, interval)
                while True:
                    body()
            except Tick:
                after_each(interruption)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``start(work, environ={}, **Service options)``: a supervised service forked from the
    test, talking to a notify socket the test binds (``service_kit.py``); everything it
    started is gone after the test."""
    from service_kit import service_factory

    with service_factory(tmp_path) as factory:
        yield factory
