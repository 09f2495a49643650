"""Helpers for the dask tests: a cluster that is not a child of the test process, and the
task functions its workers import (this directory is on their PYTHONPATH).

Why not ``LocalCluster`` in the test process: the autouse fixture of ``conftest.py`` kills
and fails on any child left after each test, and a module-scoped cluster's workers are
children of the process that starts it.  So :func:`start_cluster` starts a host process
that forks once more and lets the middle process exit: the host is re-parented (to init or
a subreaper), runs ``LocalCluster(n_workers=2, processes=True)``, prints the scheduler's
address, and closes the cluster when its stdin reaches end-of-file, that is when
:meth:`ClusterHost.stop` closes the pipe or the test process dies however it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

LEASE_TIMEOUT = 1.5  # seconds: distributed.scheduler.locks.lease-timeout in these tests
LEASE_VALIDATION = 0.1  # distributed.scheduler.locks.lease-validation-interval
DASK_ENV = {
    "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": f"{LEASE_TIMEOUT}s",
    "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL": f"{LEASE_VALIDATION}s",
    "PYTHONWARNINGS": "ignore",
}
HERE = os.path.dirname(os.path.abspath(__file__))

_HOST = r"""
import os, sys
if os.fork():
    os._exit(0)
os.setsid()
from distributed import LocalCluster
with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                  dashboard_address=None) as cluster:
    print(os.getpid(), cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the test process closes the pipe, or dies
"""


def _env(lease_timeout: str | None = None) -> dict[str, str]:
    path = [HERE, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, **DASK_ENV, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    if lease_timeout is not None:
        env["DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT"] = lease_timeout
    return env


class ClusterHost:
    """The cluster's host process (not our child): its pid and the scheduler address."""

    def __init__(self, lease_timeout: str | None = None) -> None:
        starter = subprocess.Popen([sys.executable, "-c", _HOST], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   env=_env(lease_timeout))
        assert starter.stdin is not None and starter.stdout is not None
        starter.wait(30)  # the middle process exits at once; the host carries on
        self._stdin = starter.stdin
        self._stdout = starter.stdout
        ready, _, _ = select.select([self._stdout], [], [], 60)
        line = self._stdout.readline().decode().split() if ready else []
        if len(line) != 2:
            self._stdin.close()
            raise AssertionError("the dask cluster did not start within 60 s")
        self.pid = int(line[0])
        self.address = line[1]

    def stop(self, timeout: float = 30.0) -> None:
        """Close the host's stdin and wait for it to exit (SIGKILL its session after
        ``timeout`` s)."""
        fd = os.pidfd_open(self.pid)
        try:
            self._stdin.close()
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
        finally:
            os.close(fd)
            self._stdout.close()


def start_worker(address: str, name: str) -> subprocess.Popen[bytes]:
    """A dask worker without a nanny (so nobody restarts it), as a child of the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
         "--nthreads", "1", "--name", name, "--no-dashboard"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_env())


# -- tasks (imported by the workers) ------------------------------------------------------

def add_many(name: str, times: int) -> int:
    import ipcfork

    counter = ipcfork.SharedCounter(name=name, backend="dask")
    for _ in range(times):
        counter.add(1)
    return times


def locked_increments(mutex_name: str, path: str, times: int) -> int:
    """Read-modify-write a number in a file ``times`` times under a dask Mutex."""
    import ipcfork

    mutex = ipcfork.Mutex(mutex_name, backend="dask")
    for _ in range(times):
        with mutex:
            with open(path) as f:
                value = int(f.read() or 0)
            os.sched_yield()  # widen the race a little
            with open(path, "w") as f:
                f.write(str(value + 1))
    mutex.close()
    return times


def bounded(sem_name: str, counter_name: str, times: int) -> int:
    """Under a dask Semaphore, count the holders; return the most seen at once."""
    import ipcfork

    sem = ipcfork.Semaphore(name=sem_name, backend="dask")
    inside = ipcfork.SharedCounter(name=counter_name, backend="dask")
    most = 0
    for _ in range(times):
        with sem:
            most = max(most, inside.add_and_get(1))
            inside.add(-1)
    sem.close()
    return most


def hold_forever(mutex_name: str) -> None:
    """Take the mutex and never give it back (the test kills this worker)."""
    import threading

    import ipcfork

    mutex = ipcfork.Mutex(mutex_name, backend="dask")
    mutex.acquire()
    threading.Event().wait()


def segfault() -> None:
    ctypes.string_at(0)


def exit_hard(code: int) -> None:
    os._exit(code)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def square(x: int) -> int:
    return x * x


def fail_on(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def my_pid() -> int:
    return os.getpid()


def use_dask_inside() -> Any:
    import ipcfork

    return ipcfork.Mutex("inside-fork", backend="dask")


def forked_pools() -> tuple[int, int]:
    """How many pools ``forked`` keeps in this worker process, and its limit."""
    import importlib

    module = importlib.import_module("ipcfork.dask.forked")
    return sum(1 for key in module._POOLS if key[0] == os.getpid()), module.MAX_POOLS
