"""Handing a task's outcome from a child to its parent through shared memory.

Small outcomes go into the child's slot of the pool's :class:`OutcomeArena` (below).  A large
one is *spilled*: the child pickles it with protocol 5, keeping large buffers (numpy arrays,
bytearrays, a ``bytes`` result) out of band, and writes everything into a fresh POSIX shared
memory object whose name the parent chose before forking; the slot then holds that name.
The parent maps it, unlinks it at once and unpickles straight from the mapping: out-of-band
buffers become views of the mapping (a numpy result is not copied at all), in-band data is
copied once.

Spill layout (little-endian, offsets in bytes)::

    0   magic  b"IPCFOUT1"
    8   done   u64: the total size, written last; 0 while the child is still writing
    16  kind   u64: 0 result, 1 exception
    24  plen   u64: length of the pickle
    32  nbuf   u64: number of out-of-band buffers
    40  nbuf x (offset u64, length u64)
    ... the pickle, then each buffer, every piece 64-byte aligned

Completeness: the parent reads an outcome only after the child has exited (its pidfd polled
readable and ``wait4`` returned); process exit orders every store the child made before it,
and ``done`` equal to the size proves the child got to the end rather than dying midway.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import struct
from typing import Any

import posix_ipc

from .._os.names import POSIX_PREFIX
from .._os.security import CREATE_MODE

__all__ = ["EXCEPTION", "RESULT", "OutcomeArena", "discard_outcome", "outcome_name",
           "read_outcome", "write_outcome"]

RESULT, EXCEPTION = 0, 1
_MAGIC = b"IPCFOUT1"
_HEAD = struct.Struct("<8sQQQQ")
_SPAN = struct.Struct("<QQ")
_ALIGN = 64
_RAW_FLAG = 1 << 8  # in ``kind``: a bytes/bytearray result carried as its one buffer
_IOV_MAX = 1024
_MAX_READ = 0x7FFFF000  # the most Linux moves in one read()
_PREFIX = 4096  # bytes read first: header, spans and a small pickle


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def outcome_name(parent_pid: int, pool_tag: str, task_id: int, attempt: int) -> str:
    """The shm name a task's child spills a large outcome to: tagged with the parent's pid
    (``ipcfork clean`` finds the spills of a parent that was SIGKILLed), a random tag per
    pool (a recycled pid never meets an old name) and the task's id and attempt."""
    return f"/{POSIX_PREFIX}{parent_pid}.out.{pool_tag}.{task_id}.{attempt}"


class _Raw:
    """Stands for a bytes or bytearray result carried as one out-of-band buffer, so it is
    copied once into shared memory and once out, never through a pickle."""

    def __init__(self, kind: type) -> None:
        self.kind = kind


_RAW_BYTES = pickle.dumps(_Raw(bytes), protocol=5)
_RAW_BYTEARRAY = pickle.dumps(_Raw(bytearray), protocol=5)


def pickled(payload: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``payload`` keeping large buffers out of band: ``(pickle, buffers)``."""
    if type(payload) in (bytes, bytearray) and len(payload) > OutcomeArena.SLOT:
        raw = _RAW_BYTES if type(payload) is bytes else _RAW_BYTEARRAY
        return raw, [memoryview(payload)]
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    try:
        return data, [buffer.raw() for buffer in buffers]
    except BufferError:  # a non-contiguous buffer: let pickle copy everything in band
        return pickle.dumps(payload, protocol=5), []


def write_outcome(name: str, kind: int, payload: Any) -> None:
    """In the child: write ``payload`` as outcome ``kind`` to a new shm object ``name``.

    Raises pickle errors (the caller then writes an exception outcome instead) and OSError
    (no room in /dev/shm).
    """
    write_pickled(name, kind, *pickled(payload))


def write_pickled(name: str, kind: int, data: bytes, raws: list[memoryview]) -> None:
    """Write an already pickled outcome (see :func:`write_outcome`).

    With ``pwritev`` rather than through a mapping: the kernel copies straight into the
    object's pages, without a page fault per 4 KiB page (half the time for 64 MiB).
    """
    offset = _align(_HEAD.size + _SPAN.size * len(raws))
    pieces: list[Any] = []
    head = bytearray(offset)
    pieces.append(head)
    pieces.append(data)
    offset += len(data)
    spans = []
    for raw in raws:
        pieces.append(bytes(_align(offset) - offset))
        offset = _align(offset)
        spans.append((offset, raw.nbytes))
        pieces.append(raw.cast("B"))
        offset += raw.nbytes
    size = _align(offset)
    _HEAD.pack_into(head, 0, _MAGIC, 0, kind | (_RAW_FLAG if _is_raw(data) else 0),
                    len(data), len(raws))
    for i, span in enumerate(spans):
        _SPAN.pack_into(head, _HEAD.size + i * _SPAN.size, *span)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=CREATE_MODE)
    try:
        fd = shm.fd
        try:
            os.ftruncate(fd, size)
            _write_all(fd, [piece for piece in pieces if len(piece)], 0)
            os.pwrite(fd, struct.pack("<Q", size), 8)  # last: the outcome is complete
        except OSError:
            shm.unlink()  # no room in /dev/shm: the caller reports it; leave nothing
            raise
    finally:
        shm.close_fd()


def _write_all(fd: int, pieces: list[Any], offset: int) -> None:
    """``pwritev`` until every piece is written (a call may write less, or take at most
    IOV_MAX pieces)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        batch = views[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no room left for the outcome in /dev/shm")
        offset += written
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _is_raw(data: bytes) -> bool:
    """Whether ``pickled`` made ``data`` for a bytes/bytearray result (the very object)."""
    return data is _RAW_BYTES or data is _RAW_BYTEARRAY


def read_outcome(name: str) -> tuple[int, Any] | None:
    """In the parent, after the child exited: ``(kind, payload)``, or None when the child
    left no complete outcome.  The shm name is unlinked whatever happens.

    A ``bytes`` or ``bytearray`` result is read with ``pread`` (one copy, no page faults);
    anything else is unpickled straight from a mapping, so a numpy result is a view of it.

    Raises what unpickling raises (the caller reports it as the task's failure).
    """
    try:
        shm = posix_ipc.SharedMemory(name, 0)
    except posix_ipc.ExistentialError:
        return None
    try:
        shm.unlink()
        size = os.fstat(shm.fd).st_size
        if size < _HEAD.size:
            return None
        # One read for the header, and for a raw result its span and tiny pickle too.
        prefix = os.pread(shm.fd, min(size, _PREFIX), 0)
        magic, done, kind, plen, nbuf = _HEAD.unpack_from(prefix, 0)
        if magic != _MAGIC or done != size:
            return None
        if kind & _RAW_FLAG:
            at, length = _SPAN.unpack_from(prefix, _HEAD.size)
            pickle_at = _align(_HEAD.size + _SPAN.size)
            data = prefix[pickle_at:pickle_at + plen]
            if len(data) < plen:
                data = os.pread(shm.fd, plen, pickle_at)
            raw = pickle.loads(data)
            payload = _read_exactly(shm.fd, length, at, raw.kind)
            return None if payload is None else (kind & ~_RAW_FLAG, payload)
        area = mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()
    view = memoryview(area)
    pickle_at = _align(_HEAD.size + _SPAN.size * nbuf)
    buffers = []
    for i in range(nbuf):
        at, length = _SPAN.unpack_from(area, _HEAD.size + i * _SPAN.size)
        buffers.append(pickle.PickleBuffer(view[at:at + length]))
    payload = pickle.loads(view[pickle_at:pickle_at + plen], buffers=buffers)
    # Views of the mapping inside the payload (numpy arrays) keep it mapped; once they go,
    # the mapping is unmapped with the last reference.
    return kind, payload


def _read_exactly(fd: int, length: int, offset: int, kind: type) -> Any:
    """``length`` bytes at ``offset`` as ``kind`` (bytes or bytearray), copied once; None if
    the object is shorter."""
    if kind is bytes and length <= _MAX_READ:
        data = os.pread(fd, length, offset)  # read straight into the new bytes object
        if len(data) == length:
            return data
        # a short read (a signal, say): read it again below, piece by piece
    buffer = bytearray(length)
    view = memoryview(buffer)
    done = 0
    while done < length:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            return None
        done += got
    return buffer if kind is bytearray else bytes(buffer)


def discard_outcome(name: str) -> None:
    """Remove an outcome nobody will read (the task was abandoned)."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


class OutcomeArena:
    """One slot of shared memory per running child, for outcomes small enough to fit.

    Creating, mapping and unlinking a shm object per task costs more than a small task's
    whole run, so each running child gets a slot in one anonymous segment made with the
    pool.  A pickle that fits is written into the slot; a larger one goes to its own shm
    object (:func:`write_outcome`) and the slot holds its name.  Slot header: ``done`` u64
    (written last, as above), ``kind`` u64, ``spilled`` u64, ``length`` u64.
    """

    SLOT = 64 * 1024
    _SLOT_HEAD = struct.Struct("<QQQQ")

    def __init__(self, slots: int) -> None:
        from ..shm import SharedMemory

        self.slots = slots
        self._shm = SharedMemory(slots * self.SLOT)
        self._buf = self._shm.buf

    def prepare(self, slot: int) -> None:
        """Before the fork: mark the slot empty."""
        struct.pack_into("<Q", self._buf, slot * self.SLOT, 0)

    def write(self, slot: int, kind: int, payload: Any, spill_name: str) -> None:
        """In the child.  Raises as :func:`write_outcome` does."""
        data, raws = pickled(payload)
        base = slot * self.SLOT
        head = self._SLOT_HEAD.size
        if raws and head + len(data) + sum(r.nbytes for r in raws) <= self.SLOT:
            data, raws = pickle.dumps(payload, protocol=5), []  # small: in band, in the slot
        if not raws and head + len(data) <= self.SLOT:
            self._buf[base + head:base + head + len(data)] = data
            spilled = 0
        else:
            write_pickled(spill_name, kind, data, raws)
            data = spill_name.encode()
            self._buf[base + head:base + head + len(data)] = data
            spilled = 1
        self._SLOT_HEAD.pack_into(self._buf, base, 0, kind, spilled, len(data))
        struct.pack_into("<Q", self._buf, base, head + len(data))  # last: complete

    def spilled(self, slot: int) -> bool:
        """In the parent, after the child exited: whether its outcome went to a spill."""
        done, _, spilled, _ = self._SLOT_HEAD.unpack_from(self._buf, slot * self.SLOT)
        return bool(done and spilled)

    def read(self, slot: int) -> tuple[int, Any] | None:
        """In the parent, after the child exited: the outcome, or None if incomplete."""
        base = slot * self.SLOT
        done, kind, spilled, length = self._SLOT_HEAD.unpack_from(self._buf, base)
        head = self._SLOT_HEAD.size
        if done != head + length or length > self.SLOT - head:
            return None
        # A copy (at most 64 KiB): no view of the arena may outlive this call, not even in
        # the traceback of a result that fails to load.
        data = bytes(self._buf[base + head:base + head + length])
        if spilled:
            return read_outcome(data.decode())
        return kind, pickle.loads(data)

    def close(self) -> None:
        self._buf = memoryview(b"")
        self._shm.close()
