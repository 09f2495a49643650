"""Typed values and arrays in shared memory, each with a robust :class:`Mutex` as ``lock``.

``SharedValue("q", 0)`` is one 64-bit integer a fork family shares; ``SharedArray("d", 1000)``
a thousand doubles.  Reads and writes of one item are single machine stores for the integer
and float types (never torn); read-modify-write needs the lock::

    with counter.lock:
        counter.value += 1

With numpy installed, ``.numpy`` is a zero-copy array over the same memory.
"""

from __future__ import annotations

import array
import os
import struct
from typing import Any

from ._common import ClosingContext
from .errors import InvalidArgumentError
from .mutex import Mutex, companion_lock
from .shm import SharedMemory

__all__ = ["SharedArray", "SharedValue"]

TYPECODES = "bBhHiIlLqQfd"
_MAX_LENGTH = 1 << 40


def _check_typecode(typecode: object) -> str:
    if not isinstance(typecode, str) or len(typecode) != 1 or typecode not in TYPECODES:
        raise InvalidArgumentError(
            f"typecode must be one of {', '.join(TYPECODES)} (as in the array module), "
            f"not {typecode!r}", limit=f"one of {TYPECODES!r}")
    return typecode


def _typed(buffer: memoryview, typecode: str) -> memoryview:
    """``buffer`` seen as items of ``typecode`` (typeshed lists cast formats as literals)."""
    view: memoryview = buffer.cast(typecode)  # type: ignore[call-overload]
    return view


class _Shared(ClosingContext):
    """What SharedValue and SharedArray have in common: segment, typed view, lock."""

    def __init__(self, typecode: str, length: int, name: str | os.PathLike[str] | None,
                 backend: str, create: bool, exclusive: bool, allow_foreign: bool,
                 proj: int | str) -> None:
        self.typecode = _check_typecode(typecode)
        itemsize = struct.calcsize(typecode)
        self._shm = SharedMemory(itemsize * length, name, backend=backend, create=create,
                                 exclusive=exclusive, allow_foreign=allow_foreign, proj=proj)
        try:
            self._items: Any = _typed(self._shm.buf, typecode)
            self.lock = companion_lock(name, backend=backend, create=create,
                                       allow_foreign=allow_foreign, proj=proj)
        except BaseException:
            self._release_views()
            self._shm.close()
            raise
        self.created = self._shm.created

    def get_lock(self) -> Mutex:
        """The lock (``multiprocessing.Value``'s spelling)."""
        return self.lock

    @property
    def numpy(self) -> Any:
        """A numpy array over the shared memory, without a copy.

        Raises ImportError naming the extra when numpy is not installed.  Release it
        (``del``) before :meth:`close`.
        """
        try:
            import numpy
        except ImportError as exc:
            raise ImportError("SharedValue.numpy / SharedArray.numpy need numpy: "
                              "pip install numpy") from exc
        return numpy.frombuffer(self._shm.buf, dtype=numpy.dtype(self.typecode))

    def _release_views(self) -> None:
        items = getattr(self, "_items", None)
        if items is not None:
            items.release()

    def close(self) -> None:
        """Drop this process's handles.  Raises BufferInUseError while numpy arrays or views
        made from this object are alive."""
        self._release_views()
        try:
            self._shm.close()
        except BaseException:
            self._items = _typed(self._shm.buf, self.typecode)
            raise
        self.lock.close()

    def unlink(self) -> None:
        """Remove a named object (segment and lock) system-wide."""
        self._shm.unlink()
        self.lock.unlink()


class SharedValue(_Shared):
    """One typed value in shared memory (``typecode`` as in :mod:`array`), with ``lock``.

    ``initial`` is written only when the value is created (a named value that exists keeps
    its contents).  ``name`` and the other options work as for :class:`SharedMemory`; the
    lock is a :class:`Mutex` named ``<name>.lock`` (posix) or keyed ``ftok(path, proj+1)``
    (sysv).  Raises InvalidArgumentError for an unknown typecode.
    """

    def __init__(self, typecode: str, initial: int | float = 0,
                 name: str | os.PathLike[str] | None = None, *, backend: str = "posix",
                 create: bool = True, exclusive: bool = False, allow_foreign: bool = False,
                 proj: int | str = "i") -> None:
        super().__init__(typecode, 1, name, backend, create, exclusive, allow_foreign, proj)
        if self.created and initial:
            self.value = initial

    @property
    def value(self) -> Any:
        """The value now (a single load)."""
        return self._items[0]

    @value.setter
    def value(self, new: int | float) -> None:
        try:
            self._items[0] = new
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{new!r} does not fit typecode {self.typecode!r}") from exc

    def __repr__(self) -> str:
        return f"<SharedValue {self.typecode!r} {self.value!r}>"


class SharedArray(_Shared):
    """``length`` typed items in shared memory, zero-filled when created, with ``lock``.

    Indexing and slicing work as on a memoryview (bounds-checked); ``tolist()`` copies out.
    Raises InvalidArgumentError for an unknown typecode or a length outside 1..2**40.
    """

    def __init__(self, typecode: str, length: int,
                 name: str | os.PathLike[str] | None = None, *, backend: str = "posix",
                 create: bool = True, exclusive: bool = False, allow_foreign: bool = False,
                 proj: int | str = "i") -> None:
        if isinstance(length, bool) or not isinstance(length, int) or not (
                1 <= length <= _MAX_LENGTH):
            raise InvalidArgumentError(f"length must be an int in 1..2**40, not {length!r}",
                                       limit="1..2**40")
        super().__init__(typecode, length, name, backend, create, exclusive, allow_foreign,
                         proj)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        item = self._items[index]
        return item.tolist() if isinstance(item, memoryview) else item

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice) and not isinstance(value, (memoryview, array.array)):
            value = array.array(self.typecode, value)  # a list or tuple of items
        try:
            self._items[index] = value
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"cannot store {type(value).__name__} at {index!r} of {self!r}: {exc}"
            ) from exc

    def tolist(self) -> list[Any]:
        """A copy of every item as a list."""
        items: list[Any] = self._items.tolist()
        return items

    def __repr__(self) -> str:
        return f"<SharedArray {self.typecode!r} x {len(self)}>"
