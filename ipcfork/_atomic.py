"""Atomic read-modify-write on 64-bit words in shared memory, through GCC's libatomic.

Python has no atomic instructions, and a lock-free shared counter needs three: fetch-and-add,
compare-and-swap and fetch-and-or/and, each a full (sequentially consistent) barrier.
``libatomic.so.1`` (shipped with GCC's runtime on every mainstream distribution) exports
them as plain C functions, so ctypes can call them without a compiler.

The library is loaded with :class:`ctypes.PyDLL`, which keeps the GIL during the call: the
calls take nanoseconds, releasing and retaking the GIL would cost more than the call, and
holding it lets one Python thread reuse its argument buffers without another thread
interleaving.  Arguments are passed as ctypes objects (``c_void_p`` addresses and
``c_int64`` values): without declared ``argtypes`` a bare Python int would travel as a C
``int`` and be truncated, and declared ``argtypes`` cost twice the call itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from .errors import IpcforkError

__all__ = ["SEQ_CST", "Atomics", "atomics", "word_address"]

SEQ_CST = 5  # __ATOMIC_SEQ_CST


class Atomics:
    """The libatomic entry points for 8-byte words, with their result types set.

    Each takes a ``c_void_p`` address first; values are ``c_int64``; the order argument is
    :data:`SEQ_CST`.  ``cas(address, pointer_to_expected, desired, SEQ_CST, SEQ_CST)``
    returns True on success and otherwise stores the word's current value in *expected*.
    """

    def __init__(self, lib: Any) -> None:
        # getattr: a dunder name written inside a class body would be name-mangled.
        self.fetch_add = getattr(lib, "__atomic_fetch_add_8")
        self.fetch_or = getattr(lib, "__atomic_fetch_or_8")
        self.fetch_and = getattr(lib, "__atomic_fetch_and_8")
        self.load = getattr(lib, "__atomic_load_8")
        self.cas = getattr(lib, "__atomic_compare_exchange_8")
        for function in (self.fetch_add, self.fetch_or, self.fetch_and, self.load):
            function.restype = ctypes.c_int64
        self.cas.restype = ctypes.c_bool


_ATOMICS: Atomics | None = None


def atomics() -> Atomics:
    """The process's :class:`Atomics`, loading libatomic on first use.

    Raises IpcforkError naming the package to install when libatomic cannot be loaded.
    """
    global _ATOMICS
    if _ATOMICS is None:
        path = "libatomic.so.1"  # the soname; find_library would spawn ldconfig
        try:
            ctypes.PyDLL(path)
        except OSError:
            path = ctypes.util.find_library("atomic") or path
        try:
            lib = ctypes.PyDLL(path)
            loaded = Atomics(lib)
            is_lock_free = getattr(lib, "__atomic_is_lock_free")
        except (OSError, AttributeError) as exc:
            raise IpcforkError(
                f"SharedCounter needs GCC's libatomic ({path}): install it (Debian and "
                f"Ubuntu: apt install libatomic1; Fedora: dnf install libatomic): {exc}"
            ) from exc
        is_lock_free.restype = ctypes.c_bool
        if not is_lock_free(ctypes.c_size_t(8), None):
            # libatomic would fall back to locks private to each process: not atomic
            # across processes at all.
            raise IpcforkError("8-byte atomic instructions are not lock-free on this "
                               "machine: SharedCounter cannot work across processes here")
        _ATOMICS = loaded
    return _ATOMICS


def word_address(buffer: memoryview, offset: int) -> int:
    """The address of byte ``offset`` of the writable ``buffer``; it must be 8-byte aligned.

    The address stays valid only while the memory stays mapped: callers must stop using it
    before the segment closes, or the process faults.
    """
    anchor = ctypes.c_char.from_buffer(buffer, offset)
    address = ctypes.addressof(anchor)
    del anchor  # drop the buffer export at once, so the segment can still be closed
    if address % 8:
        raise ValueError(f"byte {offset} of the buffer is not 8-byte aligned")
    return address
