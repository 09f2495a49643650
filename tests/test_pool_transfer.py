"""Large outcomes: zero-copy results (``result_buffer``, returned memoryviews), the spill
format shared with message queues, and what is left behind (nothing) whatever happens."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

import pytest

from ipcfork import ChildCrashedError, ForkPool, InvalidArgumentError, MessageQueue
from ipcfork.pool.transfer import result_buffer

MODES: dict[str, dict[str, Any]] = {"fork-per-task": {}, "persistent": {"tasks_per_child": None},
         "zygote": {"zygote": True}}
MIB = 1 << 20


@pytest.fixture(params=list(MODES))
def pool(request: pytest.FixtureRequest) -> Any:
    with ForkPool(2, **MODES[request.param]) as made:
        yield made


def _spills_mapped() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of its pools' outcome spills."""
    tag = f"/dev/shm/ipcfork.{os.getpid()}.out."
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if tag in line:
                low, high = line.split()[0].split("-")
                ranges.append((int(low, 16), int(high, 16)))
    return ranges


def _spills_named() -> list[str]:
    """Spill names of this process's pools still in /dev/shm."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"ipcfork.{os.getpid()}.out.")]


def _address(view: memoryview) -> int:
    np = pytest.importorskip("numpy")
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


# -- the tasks (module level: the zygote and workers get them by name) --------------------------


def fill_buffer(n: int, seed: int) -> memoryview:
    buf = result_buffer(n)
    buf[:] = _pattern(n, seed)
    return buf


def fill_array(n: int) -> dict[str, Any]:
    import numpy as np

    buf = result_buffer(8 * n)
    words = np.frombuffer(buf, np.uint64)
    words[:] = np.arange(n, dtype=np.uint64)
    return {"words": words, "head": words[:4], "label": "done"}


def copy_into_buffer(n: int) -> memoryview:
    return result_buffer(_pattern(n, 3))


def plain_view(n: int, fmt: str) -> memoryview:
    view: memoryview = memoryview(_pattern(n, 5)).cast(fmt)  # type: ignore[call-overload]
    return view


def buffer_then(how: str) -> Any:
    buf = result_buffer(MIB)
    buf[:16] = b"x" * 16
    if how == "raise":
        raise LookupError("after a buffer")
    if how == "small":
        return 42
    if how == "large":
        return b"y" * (2 * MIB)
    if how == "second":
        other = result_buffer(MIB)  # not the outcome: ordinary memory, copied once
        other[:] = _pattern(MIB, 9)
        return other
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "exit":
        os._exit(3)
    raise AssertionError(how)


def echo(data: Any) -> Any:
    return data


def frozen_objects() -> int:
    return gc.get_freeze_count()


_KEPT: list[memoryview] = []


def keep_buffer(n: int) -> memoryview:
    buf = fill_buffer(n, 1)
    _KEPT.append(buf)  # a mistake: the task writes to it again below
    return buf


def scribble() -> int:
    for buf in _KEPT:
        buf[:] = b"\xee" * len(buf)
    return len(_KEPT)


# -- result_buffer ------------------------------------------------------------------------------


def test_result_buffer_comes_back_as_a_read_only_view_without_a_copy(pool: ForkPool) -> None:
    view = pool.submit(fill_buffer, 4 * MIB, 7).result(timeout=60)
    assert type(view) is memoryview and view.readonly and view.nbytes == 4 * MIB
    assert view == _pattern(4 * MIB, 7)
    with pytest.raises(TypeError):
        view[0] = 1
    address = _address(view)
    assert any(low <= address < high for low, high in _spills_mapped())  # the spill's pages
    assert _spills_named() == []  # unlinked as soon as the parent mapped it
    view.release()
    assert _spills_mapped() == []  # released: unmapped at once


def test_numpy_arrays_on_a_result_buffer_are_views_of_the_spill(pool: ForkPool) -> None:
    np = pytest.importorskip("numpy")
    n = 1 << 19
    result = pool.submit(fill_array, n).result(timeout=60)
    words = result["words"]
    assert result["label"] == "done" and list(result["head"]) == [0, 1, 2, 3]
    assert words.dtype == np.uint64 and int(words.sum()) == n * (n - 1) // 2
    assert not words.flags.owndata
    assert any(low <= words.ctypes.data < high for low, high in _spills_mapped())
    del result, words
    gc.collect()
    assert _spills_mapped() == [] and _spills_named() == []


def test_result_buffer_from_data_and_returned_memoryviews(pool: ForkPool) -> None:
    copied = pool.submit(copy_into_buffer, 2 * MIB).result(timeout=60)
    assert copied.readonly and copied == _pattern(2 * MIB, 3)
    large = pool.submit(plain_view, 2 * MIB, "Q").result(timeout=60)
    assert large.readonly and large.format == "Q" and large.nbytes == 2 * MIB
    assert large.tobytes() == _pattern(2 * MIB, 5)
    small = pool.submit(plain_view, 1024, "B").result(timeout=60)  # through the slot
    assert small.readonly and small == _pattern(1024, 5)
    del copied, large
    gc.collect()
    assert _spills_mapped() == [] and _spills_named() == []


@pytest.mark.parametrize("how", ["raise", "small", "large", "second"])
def test_a_buffer_not_returned_leaves_nothing(pool: ForkPool, how: str) -> None:
    future = pool.submit(buffer_then, how)
    if how == "raise":
        with pytest.raises(LookupError, match="after a buffer"):
            future.result(timeout=60)
    else:
        result = future.result(timeout=60)
        expected = {"small": 42, "large": b"y" * (2 * MIB), "second": _pattern(MIB, 9)}[how]
        assert result == expected
        del result
    del future  # it holds the result too
    gc.collect()
    assert _spills_named() == [] and _spills_mapped() == []


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_a_child_dying_with_its_buffer_filled_leaves_nothing(pool: ForkPool, how: str) -> None:
    with pytest.raises(ChildCrashedError):
        pool.submit(buffer_then, how).result(timeout=60)
    assert _spills_named() == []
    assert pool.submit(fill_buffer, MIB, 2).result(timeout=60) == _pattern(MIB, 2)


def test_a_worker_cannot_change_a_view_it_handed_over() -> None:
    with ForkPool(1, tasks_per_child=None) as workers:
        view = workers.submit(keep_buffer, MIB).result(timeout=60)
        assert workers.submit(scribble).result(timeout=60) == 1  # same worker, same list
        assert view == _pattern(MIB, 1)


def test_large_bytes_and_bytearrays_both_ways(pool: ForkPool) -> None:
    data = _pattern(5 * MIB + 17 * 256, 4)  # past the huge-page threshold, not page-sized
    back = pool.submit(echo, data).result(timeout=60)  # persistent: a 5 MiB task message
    assert type(back) is bytes and back == data and hash(back) == hash(data)
    array = pool.submit(echo, bytearray(data)).result(timeout=60)
    assert type(array) is bytearray and array == data
    array[:3] = b"new"  # a plain, writable bytearray of the parent's
    assert bytes(array[:3]) == b"new"
    assert pool.submit(echo, [data, 1]).result(timeout=60) == [data, 1]


def test_children_freeze_what_they_inherit(pool: ForkPool) -> None:
    # A collection in the child must not touch (and so copy) the parent's objects.
    assert pool.submit(frozen_objects).result(timeout=60) > 1000


def test_result_buffer_outside_a_task_is_plain_memory() -> None:
    buf = result_buffer(10)
    assert not buf.readonly and buf == bytes(10)
    buf[:3] = b"abc"
    assert bytes(result_buffer(b"xyz")) == b"xyz"
    for bad in (-1, "text", 1.5, True):
        with pytest.raises(InvalidArgumentError):
            result_buffer(bad)


# -- the spill format, shared with message queues ----------------------------------------------


def test_message_queue_spills_use_the_same_format() -> None:
    np = pytest.importorskip("numpy")
    with MessageQueue() as queue:
        array = np.arange(100_000, dtype=np.float64)
        queue.put({"a": array, "b": b"z" * 50_000})
        got = queue.get(timeout=10)
        assert np.array_equal(got["a"], array) and got["b"] == b"z" * 50_000
        assert not got["a"].flags.owndata  # a view of the spill: not copied by the reader
        queue.put(b"q" * 100_000)
        assert queue.get(timeout=10) == b"q" * 100_000
        queue.put(memoryview(b"m" * 100_000))
        view = queue.get(timeout=10)
        assert type(view) is memoryview and view.readonly and view == b"m" * 100_000
        queue.put(bytearray(b"s" * 100))  # small: inline, as before
        assert queue.get(timeout=10) == bytearray(b"s" * 100)
