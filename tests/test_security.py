"""Safe names: 0600 whatever the umask; squatted or world-writable objects are refused."""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import posix_ipc
import pytest
import sysv_ipc
from conftest import fork, reap

import ipcfork
from ipcfork import MessageQueue, Mutex, Semaphore, SharedMemory
from ipcfork._mutex_posix import INIT_WAIT, MUTEX_SUFFIX
from ipcfork._mutex_sysv import OWNER_KEY_FLIP
from ipcfork._os.native import RobustMutex

NOBODY = 65534

OPENERS: dict[str, Callable[..., Any]] = {
    "semaphore": lambda name, backend, **kw: Semaphore(1, name, backend=backend, **kw),
    "mutex": lambda name, backend, **kw: Mutex(name, backend=backend, **kw),
    "shm": lambda name, backend, **kw: SharedMemory(64, name, backend=backend, **kw),
    "queue": lambda name, backend, **kw: MessageQueue(name, backend=backend, **kw),
}


def _plant(kind: str, name: str, backend: str, uid: int | None) -> None:
    """Create a 0666 object as ``uid`` (in a child) the way a squatter would."""

    def squatter() -> None:
        if uid is not None:
            os.setgid(NOBODY)
            os.setuid(uid)
        os.umask(0)
        if backend == "posix":
            if kind == "semaphore":
                posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o666, initial_value=1)
            elif kind == "mutex":  # an initialised robust mutex, as a real squatter's
                planted = posix_ipc.SharedMemory(name + MUTEX_SUFFIX, posix_ipc.O_CREX,
                                                 mode=0o666, size=4096)
                block = mmap.mmap(planted.fd, 4096)
                core = RobustMutex()
                assert core._bind(block, 0, True, "planted")
                core._unbind()
                block.close()
            elif kind == "shm":
                posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o666, size=64)
            else:
                posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o666)
            return
        key = sysv_ipc.ftok(name, ord("i"), silence_warning=True)
        if kind in ("semaphore", "mutex"):
            # Used once (a semop), as a real squatter's is: a set never operated on is
            # refused as uninitialised whatever its owner.
            sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, mode=0o666).release()
        if kind in ("shm", "mutex"):
            shm_key = key ^ OWNER_KEY_FLIP if kind == "mutex" else key
            sysv_ipc.SharedMemory(shm_key, sysv_ipc.IPC_CREX, mode=0o666, size=4096)
        if kind == "queue":
            sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o666)

    assert reap(fork(squatter)) == 0


def _remove_planted(kind: str, name: str, backend: str) -> None:
    if backend == "posix":
        if kind == "mutex":
            posix_ipc.unlink_shared_memory(name + MUTEX_SUFFIX)
            return
        remove = {"semaphore": posix_ipc.unlink_semaphore,
                  "shm": posix_ipc.unlink_shared_memory,
                  "queue": posix_ipc.unlink_message_queue}[kind]
        remove(name)
        return
    key = sysv_ipc.ftok(name, ord("i"), silence_warning=True)
    if kind in ("semaphore", "mutex"):
        sysv_ipc.Semaphore(key).remove()
    if kind in ("shm", "mutex"):
        # Opening attaches: detach after removing.
        segment = sysv_ipc.SharedMemory(key ^ OWNER_KEY_FLIP if kind == "mutex" else key)
        segment.remove()
        segment.detach()
    if kind == "queue":
        sysv_ipc.MessageQueue(key).remove()


@pytest.mark.parametrize("kind", sorted(OPENERS))
@pytest.mark.parametrize("uid", [NOBODY, None], ids=["other-uid", "own-uid-0666"])
def test_planted_object_is_refused(kind: str, uid: int | None, backend: str, name: str) -> None:
    _plant(kind, name, backend, uid)
    try:
        with pytest.raises(ipcfork.UnsafeObjectError) as info:
            OPENERS[kind](name, backend)
        assert isinstance(info.value, PermissionError)
        assert "allow_foreign=True" in str(info.value)
        opened = OPENERS[kind](name, backend, allow_foreign=True)
        opened.close()
    finally:
        _remove_planted(kind, name, backend)


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_created_objects_are_0600_whatever_the_umask(umask: int, backend: str,
                                                     name: str) -> None:
    old = os.umask(umask)
    try:
        sem = Semaphore(1, name, backend=backend)
        shm = SharedMemory(64, name, backend=backend)
        queue = MessageQueue(name, backend=backend)
    finally:
        os.umask(old)
    try:
        if backend == "posix":
            body = name.lstrip("/")
            modes = [os.stat(f"/dev/shm/sem.{body}").st_mode, os.stat(f"/dev/shm/{body}").st_mode]
        else:
            modes = [sem._impl.raw.mode, shm._raw.mode, queue._queue.mode]
        assert [stat.S_IMODE(m) for m in modes] == [0o600] * len(modes)
    finally:
        for obj in (sem, shm, queue):
            obj.unlink()
            obj.close()


def test_zero_length_posix_semaphore_is_refused_not_a_crash() -> None:
    name = f"/ipcfork-test.{os.getpid()}.empty"
    path = f"/dev/shm/sem.{name[1:]}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        with pytest.raises(ipcfork.ObjectCorruptError, match="too short"):
            Semaphore(1, name)
    finally:
        os.unlink(path)


def test_zero_length_posix_mutex_is_refused_after_a_bounded_wait() -> None:
    name = f"/ipcfork-test.{os.getpid()}.empty"
    path = f"/dev/shm/{name[1:]}{MUTEX_SUFFIX}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        started = time.monotonic()
        with pytest.raises(ipcfork.ObjectCorruptError, match="0 bytes"):
            Mutex(name)
        assert time.monotonic() - started >= INIT_WAIT * 0.9  # it waited for a creator
    finally:
        os.unlink(path)
