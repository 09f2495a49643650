"""A supervised service under test: forked from the test, talking to a real notify socket
that the test binds, logging to a file, and removed without a trace afterwards.

The notify socket is how the tests synchronise: READY=1, STATUS= and RELOADING=1 say what
the supervisor has done, so no test sleeps to wait for it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ipcfork import CrashLoopError, Service, ServiceRunningError, WorkerContext
from ipcfork.service.descendants import descendants
from ipcfork.service.status import StatusTable
from ipcfork.testing import wait_gone

EXIT_CRASH_LOOP = 3
EXIT_ALREADY_RUNNING = 4


def steady(ctx: WorkerContext) -> None:
    """A well-behaved worker: short units, a heartbeat after each, stops when asked."""
    while not ctx.stopping:
        time.sleep(0.02)  # the unit of work
        ctx.heartbeat()


class Notifications:
    """Datagrams received on the test's notify socket, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.seen: list[tuple[float, str]] = []
        self._cursor = 0
        self.describe: Callable[[], str] = str  # more words for a failure (the log)

    def _receive(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([self.socket], [], [], left)
        if not ready:
            return False
        self.seen.append((time.monotonic(), self.socket.recv(65536).decode()))
        return True

    def wait_for(self, line: str, timeout: float = 20.0) -> tuple[float, str]:
        """The next datagram (after the last one waited for) with a line starting with
        ``line``, as ``(arrival time, text)``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.seen):
                arrived, text = self.seen[self._cursor]
                self._cursor += 1
                if any(part.startswith(line) for part in text.split("\n")):
                    return arrived, text
            if not self._receive(deadline):
                raise AssertionError(f"no {line!r} within {timeout} s; got "
                                     f"{[text for _, text in self.seen]}\n{self.describe()}")

    def drain(self) -> list[str]:
        """Every datagram already queued on the socket, without waiting; later waits look
        only at what arrives after them."""
        while self._receive(time.monotonic() + 0.001):
            pass
        self._cursor = len(self.seen)
        return [text for _, text in self.seen]

    def close(self) -> None:
        self.socket.close()


class RunningService:
    """A service started by :func:`start`."""

    def __init__(self, pid: int, notify: Notifications, log_path: Path,
                 pidfile: str | None) -> None:
        self.pid = pid
        self.notify = notify
        self.log_path = log_path
        self.pidfile = pidfile
        self.exitcode: int | None = None
        notify.describe = self.log

    def log(self) -> str:
        """What the supervisor and its workers logged so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def summary(self) -> dict[str, Any]:
        """The status table, as ``ipcfork status --json`` shows it."""
        table = StatusTable.open(self.pid)
        try:
            return table.summary()
        finally:
            table.close()

    def running(self) -> list[dict[str, Any]]:
        """The running (not draining) workers' rows."""
        return [row for row in self.summary()["workers"] if row["state"] == "running"]

    def kill(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Reap the supervisor and return its exit status (AssertionError after timeout)."""
        if self.exitcode is not None:
            return self.exitcode
        fd = os.pidfd_open(self.pid)
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not ready:
            raise AssertionError(f"service {self.pid} still runs after {timeout} s:\n"
                                 f"{self.log()}")
        _, status = os.waitpid(self.pid, 0)
        self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode


def _child(work: Callable[..., Any], options: dict[str, Any], notify_path: Path,
           log_path: Path, environ: dict[str, str]) -> None:
    code = 1
    try:
        # Tests kill workers with SIGSEGV on purpose: no stack dump from pytest's
        # faulthandler (inherited through the fork) for each of them in the test output.
        faulthandler.disable()
        os.environ["NOTIFY_SOCKET"] = str(notify_path)
        os.environ.update(environ)
        logger = logging.getLogger("ipcfork.service")
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        Service(work, **options).run()
        code = 0
    except CrashLoopError as exc:
        logging.getLogger("ipcfork.service").error("CrashLoopError: %s", exc)
        code = EXIT_CRASH_LOOP
    except ServiceRunningError as exc:
        logging.getLogger("ipcfork.service").error("ServiceRunningError: %s", exc)
        code = EXIT_ALREADY_RUNNING
    except BaseException:
        with open(log_path, "a") as log:
            log.write(traceback.format_exc())
    finally:
        os._exit(code)


@contextlib.contextmanager
def service_factory(tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Yields ``start(work, environ={}, **Service options)``.  At the end every service still
    running is SIGKILLed and reaped, everything it started is waited for, and the status
    tables of killed supervisors are removed."""
    started: list[RunningService] = []

    def start(work: Callable[..., Any], *, environ: dict[str, str] | None = None,
              **options: Any) -> RunningService:
        index = len(started)
        notify = Notifications(tmp_path / f"notify{index}")
        log_path = tmp_path / f"service{index}.log"
        pid = os.fork()
        if pid == 0:
            notify.socket.close()
            _child(work, options, notify.path, log_path, environ or {})
        running = RunningService(pid, notify, log_path, options.get("pidfile"))
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            if running.exitcode is None:
                below = descendants(running.pid)
                with contextlib.suppress(ProcessLookupError):
                    running.kill(signal.SIGKILL)
                running.wait()
                wait_gone(below)
            with contextlib.suppress(OSError):  # the table of a SIGKILLed supervisor
                StatusTable.remove(running.pid)
            running.notify.close()


Start = Callable[..., RunningService]
