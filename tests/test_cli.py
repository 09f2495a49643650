"""``ipcfork ls`` and ``ipcfork clean``: find and remove what a SIGKILLed creator left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import Pipe, fork, reap

import ipcfork


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipcfork", *args], capture_output=True,
                          text=True, timeout=60, check=True)


def test_clean_removes_objects_of_a_killed_creator(pipe: Pipe, keyfile: str) -> None:
    name = f"/ipcfork-test.{os.getpid()}.cli"

    def creator() -> None:
        kept = [
            ipcfork.Semaphore(1, backend="sysv"),  # anonymous: needs cleaning after SIGKILL
            ipcfork.Semaphore(1, keyfile, backend="sysv"),
            ipcfork.SharedMemory(64, name),
        ]
        pipe.send()
        signal.pause()
        del kept

    pid = fork(creator)
    pipe.recv()
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL

    listed = json.loads(_cli("ls", "--json").stdout)
    mine = [r for r in listed if r["creator_pid"] == pid]
    assert {(r["backend"], r["kind"]) for r in mine} == {("sysv", "semaphore"),
                                                        ("posix", "shm")}
    assert len(mine) == 3 and not any(r["creator_alive"] for r in mine)
    assert "orphan" in _cli("ls").stdout

    out = _cli("clean").stdout
    assert out.count("removed") >= 3
    after = json.loads(_cli("ls", "--json").stdout)
    assert not [r for r in after if r["creator_pid"] == pid]


def test_clean_spares_live_creators() -> None:
    sem = ipcfork.Semaphore(1, backend="sysv")
    out = _cli("clean").stdout
    assert str(sem._impl.semid) not in out
    assert sem.acquire(blocking=False)
    sem.close()


def test_help_and_bad_command() -> None:
    assert "clean" in _cli("--help").stdout
    bad = subprocess.run([sys.executable, "-m", "ipcfork", "frobnicate"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
