"""SharedMemory: zero-filled, shared across fork, bounds-checked, safe close."""

from __future__ import annotations

import importlib.util

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
