"""Autouse guards around every test: no leaked IPC object, no child left (live or zombie),
signal handlers restored; plus the ``backend`` fixture and fork helpers."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import tempfile
from collections.abc import Callable, Iterator
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
