"""SharedMemory: zero-filled, shared across fork, bounds-checked, safe close."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import time
from collections.abc import Iterator

import posix_ipc
import pytest
from conftest import fork, reap

import ipcfork
from ipcfork import SharedMemory


def test_new_segment_is_zero_filled(backend: str) -> None:
    shm = SharedMemory(10000, backend=backend)
    assert shm.size == 10000
    assert bytes(shm.buf) == bytes(10000)
    shm.close()


def test_child_writes_parent_reads(backend: str) -> None:
    shm = SharedMemory(4096, backend=backend)

    def child() -> None:
        shm.buf[:5] = b"hello"

    assert reap(fork(child)) == 0
    assert bytes(shm.buf[:5]) == b"hello"
    shm.close()


def test_bounds_are_checked(backend: str) -> None:
    shm = SharedMemory(16, backend=backend)
    with pytest.raises(IndexError):
        shm.buf[16]
    with pytest.raises(ValueError):
        shm.buf[10:20] = b"0123456789"
    shm.close()


def test_close_refused_while_views_live(backend: str) -> None:
    shm = SharedMemory(64, backend=backend)
    view = shm.buf[8:16]
    with pytest.raises(ipcfork.BufferInUseError):
        shm.close()
    assert bytes(view) == bytes(8)  # still usable: nothing was unmapped
    view.release()
    words = shm.buf.cast("Q")
    with pytest.raises(BufferError):
        shm.close()
    words.release()
    shm.close()
    shm.close()  # twice is harmless
    with pytest.raises(ipcfork.ObjectClosedError):
        shm.buf  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy not installed")
def test_numpy_view_is_zero_copy_and_blocks_close(backend: str) -> None:
    import numpy as np

    shm = SharedMemory(8 * 100, backend=backend)
    array = np.frombuffer(shm.buf, dtype=np.int64)

    def child() -> None:
        np.frombuffer(shm.buf, dtype=np.int64)[:] = np.arange(100)

    assert reap(fork(child)) == 0
    assert int(array.sum()) == sum(range(100))
    with pytest.raises(ipcfork.BufferInUseError):
        shm.close()
    del array
    shm.close()


def test_named_segment_opens_with_its_size(backend: str, name: str) -> None:
    first = SharedMemory(1234, name, backend=backend)
    first.buf[:3] = b"abc"
    second = SharedMemory(name=name, backend=backend, create=False)
    assert second.size >= 1234 and bytes(second.buf[:3]) == b"abc"
    second.close()
    first.unlink()
    first.close()
    with pytest.raises(ipcfork.ObjectNotFoundError):
        SharedMemory(name=name, backend=backend, create=False)


@pytest.mark.parametrize("size", [0, -1, 2.5, "10", True])
def test_bad_sizes(backend: str, size: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="size"):
        SharedMemory(size, backend=backend)  # type: ignore[arg-type]


def test_huge_size_names_the_limit(backend: str) -> None:
    with pytest.raises(ipcfork.LimitExceededError) as info:
        SharedMemory(2**62, backend=backend)
    assert info.value.limit


def test_posix_anonymous_segment_leaves_no_name() -> None:
    import os

    before = set(os.listdir("/dev/shm"))
    shm = SharedMemory(100)
    assert set(os.listdir("/dev/shm")) == before
    shm.close()


# -- opening a POSIX object its creator has not sized yet -----------------------------------


@pytest.fixture
def empty_posix_object() -> Iterator[str]:
    """A real POSIX shm object, 0600 and 0 bytes long: what a creator leaves between
    ``shm_open(O_CREAT | O_EXCL)`` and sizing it.  Unlinked after the test."""
    name = f"/ipcfork-test.{os.getpid()}.{secrets.token_hex(4)}"
    raw = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    raw.close_fd()
    yield name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


def _holds_open(pid: int, path: str) -> bool:
    """True if process ``pid`` has a descriptor open on ``path``."""
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
    return False


def test_open_waits_for_the_creator_to_size_the_object(empty_posix_object: str) -> None:
    """A child opens (``create=False``) an object still 0 bytes long and waits for it; once
    the test (the "creator") sizes and fills it, the child maps it with its real size and
    sees the creator's bytes.  The child is proved to be waiting (it holds the object open
    and has not exited) before the object is sized."""
    name, size = empty_posix_object, 8192

    def opener() -> int:
        shm = SharedMemory(name=name, create=False)
        ok = shm.size == size and bytes(shm.buf[:6]) == b"sized!"
        shm.close()
        return 0 if ok else 3

    child = fork(opener)
    deadline = time.monotonic() + 30
    while not _holds_open(child, "/dev/shm" + name):
        finished, status = os.waitpid(child, os.WNOHANG)
        assert not finished, (
            f"the opener gave up at once (exit {os.waitstatus_to_exitcode(status)})")
        assert time.monotonic() < deadline, "the opener never opened the object"
        os.sched_yield()
    fd = os.open("/dev/shm" + name, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, b"sized!", 0)
    finally:
        os.close(fd)
    assert reap(child) == 0


def test_open_refuses_an_object_left_empty(empty_posix_object: str) -> None:
    """An object that stays 0 bytes long (its creator died before sizing it) is refused
    after a bounded wait, with ObjectCorruptError naming the object and the limit."""
    from ipcfork._os import posix as _posix

    start = time.monotonic()
    with pytest.raises(ipcfork.ObjectCorruptError) as refused:
        SharedMemory(name=empty_posix_object, create=False)
    elapsed = time.monotonic() - start
    assert elapsed >= _posix.INIT_WAIT * 0.9
    assert elapsed < _posix.INIT_WAIT + 20
    assert empty_posix_object in str(refused.value)
    assert f"{_posix.INIT_WAIT} s" in str(refused.value)
    assert refused.value.backend == "posix" and refused.value.limit is not None
    # create-or-open finds it existing and waits the same way
    with pytest.raises(ipcfork.ObjectCorruptError):
        SharedMemory(64, name=empty_posix_object)
