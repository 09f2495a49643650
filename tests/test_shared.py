"""SharedValue and SharedArray: typed, shared across fork, locked, zero-copy for numpy."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import fork, reap

import ipcfork
from ipcfork import SharedArray, SharedValue


@pytest.mark.parametrize(("typecode", "value"), [("q", -(2**62)), ("Q", 2**63), ("d", 2.5),
                                                 ("b", -7), ("f", 0.5)])
def test_values_of_each_type(typecode: str, value: float) -> None:
    shared = SharedValue(typecode, value)
    assert shared.value == value
    shared.close()


def test_locked_increments_across_processes_are_exact(backend: str) -> None:
    counter = SharedValue("q", 0, backend=backend)

    def bump() -> None:
        for _ in range(2000):
            with counter.lock:
                counter.value += 1

    pids = [fork(bump) for _ in range(4)]
    assert [reap(pid) for pid in pids] == [0] * 4
    assert counter.value == 8000
    assert not counter.lock.locked()  # every worker gave the lock back
    counter.close()


def test_array_items_slices_and_bounds(backend: str) -> None:
    array = SharedArray("i", 10, backend=backend)
    assert array.tolist() == [0] * 10 and len(array) == 10
    array[2] = 5
    array[3:6] = [1, 2, 3]

    def child() -> None:
        array[9] = os.getpid() % 1000

    pid = fork(child)
    assert reap(pid) == 0
    assert array[2] == 5 and array[3:6] == [1, 2, 3] and array[9] == pid % 1000
    with pytest.raises(IndexError):
        array[10]
    with pytest.raises(ipcfork.InvalidArgumentError):
        array[0] = "x"
    array.close()


def test_named_value_keeps_its_contents(backend: str, name: str) -> None:
    first = SharedValue("q", 41, name, backend=backend)
    second = SharedValue("q", 7, name, backend=backend)  # opens: 7 is ignored
    assert second.value == 41 and not second.created
    with second.lock:
        second.value += 1
    assert first.value == 42
    assert not first.lock.locked()  # one lock for both handles, and it was given back
    second.close()
    first.unlink()
    first.close()


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy not installed")
def test_numpy_view_is_zero_copy() -> None:
    array = SharedArray("d", 100)
    view = array.numpy
    view[:] = 1.5
    assert array[99] == 1.5
    with pytest.raises(ipcfork.BufferInUseError):
        array.close()
    del view
    array.close()


@pytest.mark.parametrize("bad", ["x", "qq", 3, "u"])
def test_bad_typecodes(bad: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="typecode"):
        SharedValue(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2**41])
def test_bad_lengths(bad: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError, match="length"):
        SharedArray("q", bad)  # type: ignore[arg-type]
