"""Spills: one Python object handed to another process through a POSIX shared memory object
of its own, when it is too large for the channel it would otherwise travel in (a pool's
outcome slot, a message queue's message).  One format and one writer/reader for both.

The writer pickles the object with protocol 5, large buffers (numpy arrays, bytearrays,
memoryviews) out of band (:func:`dump`), and writes everything into a fresh object with
``pwritev``: the kernel copies straight into the object's pages, without a page fault per
4 KiB page in the writer.  The reader (:func:`read_spill`) opens the object, checks its
owner, unlinks it at once (nothing can leak from then on) and:

* a ``bytes``/``bytearray`` object, carried as its one buffer, is read with ``pread``
  straight into a new object (one copy, no mapping to fault in);
* anything else is unpickled from a mapping of the object: out-of-band buffers become
  views of it (a numpy array is not copied) and a memoryview comes back as a read-only
  memoryview of it.  The mapping goes away with the last view of it.

A spill can also be *reserved* before its content exists (:class:`Reservation`): the writer
maps it and fills it in place (``ipcfork.result_buffer``), and buffers that lie inside it
are referenced where they are instead of being written again.

Layout (little-endian, offsets in bytes)::

    0   magic  b"IPCFSPL1"
    8   done   u64: the total size, written last; 0 while the writer is still at it
    16  flags  u64: the caller's kind (low 8 bits) | RAW_BYTES | RAW_BYTEARRAY | VIEW
    24  meta   u64: offset of the meta block: nbuf x (offset u64, length u64), the pickle
    32  plen   u64: length of the pickle
    40  nbuf   u64: number of out-of-band buffers
    48  (16 bytes reserved)
    ... buffers, each 64-byte aligned (a reservation's data at DATA_AT, one page in)

``done`` equal to the object's size proves the writer got to the end: a reader sees a
writer that died midway as an incomplete spill (``None``), never as a short object.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import pickle
import struct
import sys
import weakref
from typing import Any

import posix_ipc

from ._os.security import CREATE_MODE, check_owner

__all__ = ["DATA_AT", "Reservation", "discard_spill", "dump", "map_file", "read_spill",
           "write_spill"]

_MAGIC = b"IPCFSPL1"
_HEADER = struct.Struct("<8sQQQQQ16x")
_SPAN = struct.Struct("<QQ")
_DONE = struct.Struct("<Q")
_ALIGN = 64
_KIND = 0xFF
_RAW_BYTES, _RAW_BYTEARRAY, _VIEW = 1 << 8, 1 << 9, 1 << 10
DATA_AT = mmap.PAGESIZE  # a reservation's data starts one page in: page-aligned for its user
_PREFIX = 4096  # bytes read first: header, spans and a small pickle
_IOV_MAX = 1024
_MAX_READ = 0x7FFFF000  # the most Linux moves in one read()
_PLAIN = (int, float, str, bool, type(None))  # never hold a buffer: no callback needed

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
# One ctypes type for every mapping: ctypes caches a type per array length forever, so a
# type per size would grow without bound.  Views are cut to the mapping's size at once.
_WINDOW = ctypes.c_char * (1 << 46)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


# -- mappings ---------------------------------------------------------------------------------


def map_file(fd: int, size: int, *, writable: bool, populate: bool = False) -> memoryview:
    """A memoryview of ``size`` bytes of ``fd`` mapped shared; read-only unless ``writable``.

    Mapped with libc's ``mmap`` rather than :class:`mmap.mmap`, which keeps a duplicate of
    the descriptor open for as long as the mapping lives: a program holding many results
    would run out of descriptors.  The mapping is unmapped when the last view of it is
    released or collected.  Raises OSError if the kernel refuses the mapping.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    addr = _mmap(None, size, prot, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"mmap of {size} bytes: {os.strerror(code)}")
    try:
        window = _WINDOW.from_address(addr)
        weakref.finalize(window, _munmap, addr, size).atexit = False  # not under live views
        view = memoryview(window).cast("B")[:size]
    except BaseException:
        _munmap(addr, size)
        raise
    return view if writable else view.toreadonly()


def _address(raw: memoryview) -> int | None:
    """Where ``raw`` (contiguous bytes) starts in memory, or None if that cannot be told."""
    if not raw.nbytes:
        return None
    if not raw.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(raw))
    numpy = sys.modules.get("numpy")  # a read-only view: numpy can tell, if it is loaded
    if numpy is not None:
        return int(numpy.frombuffer(raw, numpy.uint8).ctypes.data)
    return None


# -- pickling ---------------------------------------------------------------------------------


def _load_view(data: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """A memoryview result, read-only, with its format and shape when they can be kept."""
    view = memoryview(data).toreadonly()
    if fmt != "B" or len(shape) != 1:
        with contextlib.suppress(TypeError, ValueError):  # a format cast() cannot make
            typed: memoryview = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
            return typed
    return view


class _ViewPickler(pickle.Pickler):
    """Pickles memoryviews too (the plain pickler refuses them): as their bytes, out of band
    when a buffer callback is given, so the reader gets a view of the spill."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not memoryview:
            return NotImplemented
        try:
            data: Any = pickle.PickleBuffer(obj)
            data.raw()  # BufferError if not contiguous
        except BufferError:
            data = obj.tobytes()
        return _load_view, (data, obj.format, obj.shape)


def _pickle(payload: Any, buffers: list[pickle.PickleBuffer] | None, views: bool) -> bytes:
    callback = None if buffers is None else buffers.append
    if not views:
        try:
            return pickle.dumps(payload, protocol=5, buffer_callback=callback)
        except TypeError as exc:
            if "memoryview" not in str(exc):
                raise
            if buffers is not None:
                buffers.clear()
    import io

    out = io.BytesIO()
    _ViewPickler(out, protocol=5, buffer_callback=callback).dump(payload)
    return out.getvalue()


def dump(payload: Any, inline: int) -> tuple[bytes, list[memoryview], int]:
    """``(pickle, out-of-band buffers, flags)`` for ``payload``.

    Everything is in band (no buffers) when that takes at most ``inline`` bytes, so the
    caller can send it in its own channel if ``len(pickle) <= inline``; otherwise the
    result is for :func:`write_spill`.  A large ``bytes``/``bytearray`` is its one buffer
    (flags say which type) and no pickle.  Raises what pickling raises.
    """
    kind = type(payload)
    if kind in _PLAIN:
        return pickle.dumps(payload, protocol=5), [], 0
    if kind in (bytes, bytearray) and len(payload) > inline:
        return b"", [memoryview(payload)], _RAW_BYTES if kind is bytes else _RAW_BYTEARRAY
    views = kind is memoryview
    buffers: list[pickle.PickleBuffer] = []
    data = _pickle(payload, buffers, views)
    try:
        raws = [buffer.raw() for buffer in buffers]
    except BufferError:  # a non-contiguous buffer: let pickle copy everything in band
        return _pickle(payload, None, views), [], 0
    if raws and len(data) + sum(raw.nbytes for raw in raws) <= inline:
        return _pickle(payload, None, views), [], 0  # small after all: in band
    return data, raws, _VIEW if views and raws else 0


# -- writing ----------------------------------------------------------------------------------


def _create(name: str) -> int:
    """A new shm object ``name`` (0600, never an existing one); its descriptor."""
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=CREATE_MODE)
    fd = os.dup(shm.fd)
    shm.close_fd()
    return fd


def write_all(fd: int, pieces: list[Any], offset: int) -> None:
    """``pwritev`` until every piece is written at ``offset`` on (a call may write less, or
    take at most IOV_MAX pieces).  Raises OSError (ENOSPC: no room in /dev/shm)."""
    views = [memoryview(piece).cast("B") for piece in pieces if len(piece)]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no room left for the spill in /dev/shm")
        offset += written
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class Reservation:
    """A spill made before its content: ``data`` is a writable view of ``nbytes`` bytes in
    the new shm object ``name``, zero-filled, or a copy of ``source``.

    Its pages are reserved now (``posix_fallocate``; a copy is written with ``pwrite``), so
    a full /dev/shm raises OSError here rather than SIGBUS later.  Raises OSError
    (FileExistsError if ``name`` exists).
    """

    def __init__(self, name: str, nbytes: int, source: Any = None) -> None:
        self.name = name
        self.end = DATA_AT + nbytes
        self.fd = _create(name)
        try:
            if source is None:
                os.posix_fallocate(self.fd, 0, self.end)
            else:
                os.ftruncate(self.fd, DATA_AT)
                write_all(self.fd, [source], DATA_AT)
            # A zero-filled buffer is there to be written: map its pages now, in one call,
            # rather than fault them in one by one.  A copy may never be touched again.
            whole = map_file(self.fd, self.end, writable=True, populate=source is None)
        except BaseException:
            os.close(self.fd)
            discard_spill(name)
            raise
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(whole))
        self.data = whole[DATA_AT:]
        self._mapped = weakref.ref(whole.obj)

    def offset_of(self, raw: memoryview) -> int | None:
        """Where ``raw`` lies in the spill, or None if it is not inside the data."""
        addr = _address(raw)
        if addr is None:
            return None
        offset = addr - self.base
        return offset if offset >= DATA_AT and offset + raw.nbytes <= self.end else None

    def close(self, *, keep: bool) -> None:
        """Done writing: close the descriptor; unlink the name unless the spill was
        handed on (``keep``).  Calling it again does nothing."""
        if self.fd < 0:
            return
        self.data = memoryview(b"")
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        if not keep:
            discard_spill(self.name)

    def detach(self) -> None:
        """Point what is still mapped of this spill in this process at private zero pages,
        so a view kept by mistake can no longer change what the reader sees."""
        window = self._mapped()
        if window is None:
            return  # unmapped already: nothing kept a view
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED: replace in place
        _mmap(self.base, self.end, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)


def write_spill(name: str, kind: int, data: bytes, raws: list[memoryview], flags: int,
                into: Reservation | None = None) -> None:
    """Write a spill made by :func:`dump` as shm object ``name``, or into the reservation
    ``into`` (buffers inside it stay where they are; the rest follows its data).

    A new object is unlinked again if writing fails; a reservation is left to its owner.
    Raises OSError (no room in /dev/shm; FileExistsError if ``name`` exists).
    """
    spans = [None if into is None else into.offset_of(raw) for raw in raws]
    meta_len = _SPAN.size * len(raws) + len(data)
    if into is None:
        meta = _HEADER.size  # header, spans and pickle first: one read gets them all
        offset = _align(meta + meta_len)
    else:
        offset = _align(into.end)
    start = offset
    pieces: list[Any] = []
    placed = []
    for raw, at in zip(raws, spans, strict=True):
        if at is None:
            pieces.append(bytes(_align(offset) - offset))
            offset = _align(offset)
            at = offset
            pieces.append(raw)
            offset += raw.nbytes
        placed.append((at, raw.nbytes))
    if into is not None:
        meta = _align(offset)
        pieces.append(bytes(meta - offset))
    table = b"".join(_SPAN.pack(*span) for span in placed)
    header = _HEADER.pack(_MAGIC, 0, kind | flags, meta, len(data), len(raws))
    if into is None:
        size = offset
        fd = _create(name)
        pieces = [header, table, data, bytes(start - meta - meta_len), *pieces]
        at = 0
    else:
        size = meta + meta_len
        fd = into.fd
        pieces = [*pieces, table, data]
        at = start
    try:
        write_all(fd, pieces, at)
        if into is not None:
            os.pwrite(fd, header, 0)
        os.pwrite(fd, _DONE.pack(size), 8)  # last: the spill is complete
    except BaseException:
        if into is None:
            discard_spill(name)  # leave nothing behind; the caller reports the error
        raise
    finally:
        if into is None:
            os.close(fd)


# -- reading ----------------------------------------------------------------------------------


def read_spill(name: str) -> tuple[int, Any] | None:
    """``(kind, object)`` from spill ``name``, or None when there is none or it is
    incomplete (its writer died midway).  The name is unlinked whatever happens.

    Raises UnsafeObjectError for an object of another user or writable by others (left
    in place), and what unpickling raises.
    """
    try:
        shm = posix_ipc.SharedMemory(name, 0)
    except posix_ipc.ExistentialError:
        return None
    try:
        st = os.fstat(shm.fd)
        check_owner(st.st_uid, st.st_mode, f"spill {name}", "posix", allow_foreign=False)
        shm.unlink()
        head = os.pread(shm.fd, min(st.st_size, _PREFIX), 0)
        if len(head) < _HEADER.size:
            return None
        magic, done, flags, meta, plen, nbuf = _HEADER.unpack_from(head)
        if magic != _MAGIC or done != st.st_size:
            return None
        if flags & (_RAW_BYTES | _RAW_BYTEARRAY):
            span = head[meta:meta + _SPAN.size]
            if len(span) < _SPAN.size:
                span = os.pread(shm.fd, _SPAN.size, meta)
            at, length = _SPAN.unpack(span)
            raw = _read_exactly(shm.fd, length, at, bytes if flags & _RAW_BYTES else bytearray)
            return None if raw is None else (flags & _KIND, raw)
        view = map_file(shm.fd, st.st_size, writable=not flags & _VIEW)
    finally:
        shm.close_fd()
    buffers = [pickle.PickleBuffer(view[at:at + length])
               for at, length in _SPAN.iter_unpack(view[meta:meta + _SPAN.size * nbuf])]
    at = meta + _SPAN.size * nbuf
    # Views of the mapping inside the object (numpy arrays, memoryviews) keep it mapped.
    return flags & _KIND, pickle.loads(view[at:at + plen], buffers=buffers)


def _read_exactly(fd: int, length: int, offset: int, kind: type) -> Any:
    """``length`` bytes at ``offset`` as ``kind`` (bytes or bytearray), copied once; None if
    the object is shorter."""
    if length >= _HUGE_FROM:
        made = _fresh(kind, length)
        if made is not None:
            target, addr = made
            _libc.madvise(*_inner_pages(addr, length), _MADV_HUGEPAGE)
            view = memoryview(_WINDOW.from_address(addr)).cast("B")[:length]
            return target if _read_into(fd, view, offset) else None
    if kind is bytes and length <= _MAX_READ:
        data = os.pread(fd, length, offset)  # read straight into the new bytes object
        if len(data) == length:
            return data
        # a short read (a signal, say): read it again below, piece by piece
    buffer = bytearray(length)
    if not _read_into(fd, memoryview(buffer), offset):
        return None
    return buffer if kind is bytearray else bytes(buffer)


def _read_into(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``fd`` at ``offset``; False if the object is shorter."""
    done, length = 0, view.nbytes
    while done < length:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            return False
        done += got
    return True


# A large bytes result is a fresh allocation of its own (glibc maps it anew every time), and
# faulting in 4 KiB pages costs more than copying into them (57 ms against 19 ms for 64 MiB
# here): the new object's pages are advised huge (transparent huge pages: 2 MiB a fault)
# before it is filled.  The object is made uninitialised through the C API and filled
# before anything else sees it, as CPython itself fills a new bytes.
_HUGE_FROM = 4 << 20
_MADV_HUGEPAGE = 14
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_BYTES_DATA = bytes.__basicsize__ - 1  # offset of a bytes object's data (CPython layout)
_PROBE = b"ipcfork-probe"
_LAYOUT_KNOWN = (sys.implementation.name == "cpython"
                 and ctypes.string_at(id(_PROBE) + _BYTES_DATA, len(_PROBE)) == _PROBE)


def _fresh(kind: type, length: int) -> tuple[Any, int] | None:
    """A new, unfilled ``kind`` of ``length`` bytes and the address of its data; None where
    the object layout is not CPython's."""
    if kind is bytearray:
        made = _new_bytearray(None, length)
        return made, ctypes.addressof(ctypes.c_char.from_buffer(made))
    if not _LAYOUT_KNOWN:
        return None
    made = _new_bytes(None, length)
    return made, id(made) + _BYTES_DATA


def _inner_pages(addr: int, length: int) -> tuple[int, int]:
    """The whole pages inside ``[addr, addr + length)``: ``(start, size)``."""
    start = (addr + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    end = (addr + length) & ~(mmap.PAGESIZE - 1)
    return start, max(0, end - start)


def discard_spill(name: str) -> None:
    """Remove a spill nobody will read (its message or task was abandoned)."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)
