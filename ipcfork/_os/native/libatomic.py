"""The fallback's atomics: GCC's ``libatomic.so.1`` through ctypes.

Python has no atomic instructions; ``libatomic.so.1`` (GCC's runtime, on every mainstream
distribution) exports them as plain C functions that ctypes can call without a compiler.
This is the same API as the compiled ``_core.AtomicWords`` (byte offsets into a writable
buffer, int64 values, sequentially consistent), at about 300 ns a call instead of 30.

The library is loaded with :class:`ctypes.PyDLL`, which keeps the GIL during the call: the
calls take nanoseconds, and releasing the GIL would cost more than the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from ctypes import byref, c_int64, c_void_p
from typing import Any

from ...errors import InvalidArgumentError, IpcforkError, ObjectClosedError

__all__ = ["AtomicWords", "load_libatomic"]

_SEQ_CST = 5  # __ATOMIC_SEQ_CST
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_LIB: Any = None


def load_libatomic() -> Any:
    """The loaded library, with result types set.

    Raises IpcforkError naming the package to install when it cannot be loaded, or when
    8-byte atomics are not lock-free here (libatomic would then use locks private to each
    process: not atomic across processes at all).
    """
    global _LIB
    if _LIB is None:
        path = "libatomic.so.1"  # the soname; find_library would spawn ldconfig
        try:
            ctypes.PyDLL(path)
        except OSError:
            path = ctypes.util.find_library("atomic") or path
        try:
            lib = ctypes.PyDLL(path)
            for name in ("fetch_add", "fetch_or", "fetch_and", "load", "exchange"):
                getattr(lib, f"__atomic_{name}_8").restype = c_int64
            getattr(lib, "__atomic_compare_exchange_8").restype = ctypes.c_bool
            is_lock_free = getattr(lib, "__atomic_is_lock_free")
        except (OSError, AttributeError) as exc:
            raise IpcforkError(
                f"ipcfork's ctypes fallback needs GCC's libatomic ({path}) for atomics: "
                "install it (Debian and Ubuntu: apt install libatomic1; Fedora: dnf install "
                f"libatomic), or install ipcfork with a C compiler: {exc}") from exc
        is_lock_free.restype = ctypes.c_bool
        if not is_lock_free(ctypes.c_size_t(8), None):
            raise IpcforkError("8-byte atomic instructions are not lock-free on this machine: "
                               "shared atomics cannot work across processes here")
        _LIB = lib
    return _LIB


def _int64(value: object) -> c_int64:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidArgumentError(f"{value!r} is outside the int64 range -2**63..2**63-1",
                                   limit="-2**63 <= n < 2**63")
    return c_int64(value)


class AtomicWords:
    """Sequentially consistent atomics on the 64-bit words of a shared buffer.

    Offsets are in bytes, multiples of 8, bounds-checked; values are int64.  Raises
    InvalidArgumentError for a bad offset or value, ObjectClosedError after close().
    """

    __slots__ = ("_addresses", "_anchor", "_base", "_cas", "_fetch_add", "_fetch_and",
                 "_fetch_or", "_load",
                 "_size", "_swap", "_view")

    def __init__(self, buffer: Any) -> None:
        lib = load_libatomic()
        # getattr: a dunder name written in a class body would be name-mangled.
        self._load = getattr(lib, "__atomic_load_8")
        self._swap = getattr(lib, "__atomic_exchange_8")
        self._fetch_add = getattr(lib, "__atomic_fetch_add_8")
        self._fetch_or = getattr(lib, "__atomic_fetch_or_8")
        self._fetch_and = getattr(lib, "__atomic_fetch_and_8")
        self._cas = getattr(lib, "__atomic_compare_exchange_8")
        view = memoryview(buffer)
        if view.readonly:
            view.release()
            raise InvalidArgumentError("AtomicWords needs a writable buffer")
        self._view: memoryview | None = view
        self._addresses: dict[int, c_void_p] = {}
        self._anchor: Any = ctypes.c_char.from_buffer(view)  # keeps the buffer exported
        self._base = ctypes.addressof(self._anchor)
        self._size = view.nbytes
        if self._base % 8:
            self.close()
            raise InvalidArgumentError("AtomicWords needs an 8-byte aligned buffer")

    def _word(self, offset: int) -> c_void_p:
        # Each offset is checked once and its address kept: building a c_void_p per call
        # cost as much as the atomic call itself.  close() empties the table.
        try:
            return self._addresses[offset]
        except (KeyError, TypeError):
            pass
        if self._view is None:
            raise ObjectClosedError("AtomicWords is closed")
        if type(offset) is not int or offset < 0 or offset % 8 or offset > self._size - 8:
            raise InvalidArgumentError(
                f"word offset {offset!r} is outside the {self._size}-byte buffer or not a "
                "multiple of 8")
        address = self._addresses[offset] = c_void_p(self._base + offset)
        return address

    def load(self, offset: int) -> int:
        """The word at ``offset``, atomically."""
        return int(self._load(self._word(offset), _SEQ_CST))

    def store(self, offset: int, value: int) -> None:
        """Set the word at ``offset``, atomically."""
        self._swap(self._word(offset), _int64(value), _SEQ_CST)

    def fetch_add(self, offset: int, n: int) -> int:
        """Add ``n`` (wrapping like int64_t); return the value before."""
        return int(self._fetch_add(self._word(offset), _int64(n), _SEQ_CST))

    def fetch_or(self, offset: int, bits: int) -> int:
        """Or ``bits`` in; return the value before."""
        return int(self._fetch_or(self._word(offset), _int64(bits), _SEQ_CST))

    def fetch_and(self, offset: int, bits: int) -> int:
        """And ``bits`` in; return the value before."""
        return int(self._fetch_and(self._word(offset), _int64(bits), _SEQ_CST))

    def exchange(self, offset: int, value: int) -> int:
        """Set the word; return the value before."""
        return int(self._swap(self._word(offset), _int64(value), _SEQ_CST))

    def cas(self, offset: int, expected: int, new: int) -> tuple[bool, int]:
        """Compare-and-swap; return ``(swapped, the value seen before)``."""
        word, seen, desired = self._word(offset), _int64(expected), _int64(new)
        swapped = self._cas(word, byref(seen), desired, _SEQ_CST, _SEQ_CST)
        return bool(swapped), int(seen.value) if not swapped else expected

    def close(self) -> None:
        """Release the buffer."""
        self._addresses = {}  # before the view goes: no address outlives the mapping
        if self._view is not None:
            self._anchor = None
            self._view.release()
            self._view = None
