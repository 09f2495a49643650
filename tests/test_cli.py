"""``ipcfork ls`` and ``ipcfork clean``: find and remove what a SIGKILLed creator left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import posix_ipc
import sysv_ipc
from conftest import Pipe, fork, reap

import ipcfork
from ipcfork._os import registry as _registry


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


def _records_of(pid: int) -> list[dict[str, object]]:
    return [r for r in json.loads(_cli("ls", "--json").stdout) if r["creator_pid"] == pid]


def test_clean_keeps_objects_live_processes_use(pipe: Pipe, pipe2: Pipe, keyfile: str) -> None:
    """A creator makes one object of each kind and is SIGKILLed while another live process
    still uses them all (SysV segment attached, SysV semaphore and queue operated on, POSIX
    segment mapped, POSIX semaphore mapped, POSIX queue open).  ``ls`` marks them "in use"
    (not "orphan", not "live") with the users it sees; ``clean`` keeps every one; once the
    user is gone too, ``clean`` removes them all.  ``--force`` is tested separately."""
    base = f"/ipcfork-test.{os.getpid()}.inuse"
    opts = {"backend": "sysv"}

    def make(create: bool) -> list[object]:
        return [
            ipcfork.SharedMemory(64, keyfile, create=create, **opts),
            ipcfork.Semaphore(1, keyfile, proj="s", create=create, **opts),
            ipcfork.MessageQueue(keyfile, proj="q", create=create, **opts),
            ipcfork.SharedMemory(64, base + ".shm", create=create),
            ipcfork.Semaphore(1, base + ".sem", create=create),
            ipcfork.MessageQueue(base + ".mq", create=create),
        ]

    def creator() -> None:
        kept = make(True)
        pipe.send()
        signal.pause()
        del kept

    def user() -> None:
        objects = make(False)
        for obj in objects:  # operate on the SysV semaphore and queue: visible as users
            if isinstance(obj, ipcfork.Semaphore):
                with obj:
                    pass
            elif isinstance(obj, ipcfork.MessageQueue):
                obj.put(b"x")
                obj.get(timeout=30)
        pipe2.send()
        signal.pause()
        del objects

    maker = fork(creator)
    pipe.recv()
    user_pid = fork(user)
    try:
        pipe2.recv()
        os.kill(maker, signal.SIGKILL)
        assert reap(maker) == -signal.SIGKILL
        out = _cli("clean").stdout
        assert out.count("kept") == 6 and "removed" not in out, out
        records = _records_of(maker)
        kinds = {("sysv", "shm"), ("sysv", "semaphore"), ("sysv", "queue"),
                 ("posix", "shm"), ("posix", "semaphore"), ("posix", "queue")}
        assert {(r["backend"], r["kind"]) for r in records} == kinds
        for r in records:
            assert r["state"] == "in use" and r["in_use"], r
            if r["backend"] == "sysv" and r["kind"] == "shm":
                assert r["attached"] == 1, r
            else:
                assert r["users"] == [user_pid], r
        listing = _cli("ls").stdout
        assert listing.count("in use") == 6 and "orphan" not in listing, listing
    finally:
        os.kill(user_pid, signal.SIGKILL)
        reap(user_pid)
        out = _cli("clean").stdout  # also removes what a failed check above left
    assert out.count("removed") == 6, out
    assert _records_of(maker) == []


def test_clean_force_removes_objects_in_use(pipe: Pipe) -> None:
    """``clean --force`` removes a dead creator's object even while a live process (here,
    this one) still has it mapped."""
    name = f"/ipcfork-test.{os.getpid()}.force"

    def creator() -> None:
        shm = ipcfork.SharedMemory(64, name)
        pipe.send()
        signal.pause()
        shm.close()

    maker = fork(creator)
    pipe.recv()
    shm = ipcfork.SharedMemory(name=name, create=False)
    try:
        os.kill(maker, signal.SIGKILL)
        assert reap(maker) == -signal.SIGKILL
        [record] = _records_of(maker)
        assert record["state"] == "in use" and record["users"] == [os.getpid()]
        assert "kept" in _cli("clean").stdout and os.path.exists("/dev/shm" + name)
        assert "removed" in _cli("clean", "--force").stdout
        assert not os.path.exists("/dev/shm" + name)
        assert _records_of(maker) == []
    finally:
        shm.close()


def test_ls_marks_objects_already_gone(keyfile: str) -> None:
    """Records whose object was removed behind ipcfork's back (its creator, this process,
    still runs) are listed as "gone", never as "live"."""
    name = f"/ipcfork-test.{os.getpid()}.gone"
    shm = ipcfork.SharedMemory(64, name)
    sem = ipcfork.Semaphore(1, keyfile, backend="sysv")
    try:
        posix_ipc.unlink_shared_memory(name)
        sysv_ipc.remove_semaphore(sem._impl.semid)
        mine = _records_of(os.getpid())
        assert {(r["backend"], r["state"], r["exists"]) for r in mine} == {
            ("posix", "gone", False), ("sysv", "gone", False)}
        lines = [line for line in _cli("ls").stdout.splitlines()
                 if name in line or str(sem._impl.semid) in line.split()]
        assert len(lines) == 2 and all(" gone" in line and " live" not in line
                                       for line in lines), lines
    finally:
        shm.close()
        sem.close()
        for record in mine:  # drop the stale records
            _registry.forget(str(record["backend"]), str(record["kind"]),
                             str(record["ident"]))
