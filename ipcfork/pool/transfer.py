"""Handing a task's outcome from a child to its parent through shared memory.

Small outcomes go into the child's slot of the pool's :class:`OutcomeArena` (below).  A large
one is *spilled* (:mod:`ipcfork._spill`, the format message queues use too) to a fresh POSIX
shared memory object whose name the parent chose before the task started; the slot then
holds that name.  The parent maps or reads it, unlinks it at once, and a numpy result is a
view of it, not a copy.

Zero-copy results (:func:`result_buffer`): a task asks for a writable buffer that already
*is* its outcome's spill, fills it in place and returns it; the parent receives a read-only
memoryview of the same pages.  Neither side copies, and the child never builds a ``bytes``
first.  Any memoryview a task returns comes back as a read-only memoryview (a plain one is
copied once, into the spill, by ``pwrite``).

Completeness: the parent reads an outcome only after the child has exited (its pidfd polled
readable and ``wait4`` returned) or posted a completion notice; either orders every store
the child made before it, and the ``done`` words (slot and spill, each written last) prove
the child got to the end rather than dying midway.  A spill left by a child that died is
unlinked by the parent (:func:`discard_outcome` on the name it chose).
"""

from __future__ import annotations

import operator
import pickle
import struct
from typing import Any

from .._os.names import POSIX_PREFIX
from .._spill import Reservation, discard_spill, dump, read_spill, write_spill
from ..errors import InvalidArgumentError

__all__ = ["BEGIN", "EXCEPTION", "RESULT", "OutcomeArena", "discard_outcome", "outcome_name",
           "result_buffer"]

RESULT, EXCEPTION = 0, 1
_PLAIN = frozenset((int, float, str, bool, type(None)))  # hold no buffers, ever
_dumps = pickle.dumps
BEGIN = 2  # not an outcome: "a task starts in this child" (see OutcomeArena.write)


def outcome_name(parent_pid: int, pool_tag: str, task_id: int, attempt: int) -> str:
    """The shm name a task's child spills a large outcome to: tagged with the parent's pid
    (``ipcfork clean`` finds the spills of a parent that was SIGKILLed), a random tag per
    pool (a recycled pid never meets an old name) and the task's id and attempt."""
    return f"/{POSIX_PREFIX}{parent_pid}.out.{pool_tag}.{task_id}.{attempt}"


def discard_outcome(name: str) -> None:
    """Remove an outcome nobody will read (the task was abandoned, or its child died)."""
    discard_spill(name)


# -- zero-copy results (the child's side) ------------------------------------------------------


# The task running in this process (set by OutcomeArena.write(BEGIN), cleared when its
# outcome is written): the name its outcome may spill to, and the reservation
# result_buffer() made for it.  Plain globals: this is on every task's path.
_task_spill: str | None = None
_reservation: Reservation | None = None
_previous: Reservation | None = None  # the last task's handed-on buffer, in a worker


def result_buffer(source: Any) -> memoryview:
    """A writable buffer that a pool task fills and returns for the parent to receive
    without a copy: ``result_buffer(n)`` is ``n`` zero bytes, ``result_buffer(data)`` a copy
    of a bytes-like ``data`` (as ``bytearray(n)`` and ``bytearray(data)`` are).

    Inside a ForkPool task (any mode) the buffer is the task's outcome, already in shared
    memory: return it, or a numpy array made on it (``numpy.frombuffer(buf, dtype)``), or
    a container holding such, and the parent gets a read-only memoryview (a numpy array,
    writable: nobody else maps the pages once the child is done) over the same pages,
    valid until released or garbage-collected; the shared memory's
    name is gone as soon as the parent has it, so nothing is left behind whatever the
    parent keeps.  Do not write to the buffer after returning it.  Only the first buffer
    of a task is its outcome; a later one, or one made outside a pool task, is ordinary
    memory (copied once if returned).

    Raises InvalidArgumentError for a negative size or a non-buffer ``source``, and OSError
    when /dev/shm has no room for ``n`` bytes (FileExistsError if the task's spill name is
    taken).
    """
    data: Any = None
    try:  # any integer (numpy's too) is a size, as for bytearray(n)
        nbytes = operator.index(source) if not isinstance(source, bool) else None
    except TypeError:
        nbytes = None
    if nbytes is not None:
        if nbytes < 0:
            raise InvalidArgumentError(f"result_buffer size must be >= 0, not {nbytes}")
    else:
        try:
            data = memoryview(source).cast("B")
        except TypeError as exc:
            raise InvalidArgumentError(
                f"result_buffer takes a size or a bytes-like object, not "
                f"{type(source).__name__}") from exc
        nbytes = data.nbytes
    global _reservation
    if _task_spill is None or _reservation is not None:
        return memoryview(bytearray(nbytes) if data is None else bytearray(data))
    _reservation = Reservation(_task_spill, nbytes, data)
    return _reservation.data


def _begin(spill: str) -> None:
    """A task starts in this process: its result buffer, if it asks, spills to ``spill``."""
    global _task_spill, _reservation, _previous
    if _previous is not None:
        # A persistent worker: the last task's buffer now belongs to the parent alone.
        _previous.detach()
        _previous = None
    _task_spill, _reservation = spill, None


# -- the arena ---------------------------------------------------------------------------------


class OutcomeArena:
    """One slot of shared memory per running child, for outcomes small enough to fit.

    Creating, mapping and unlinking a shm object per task costs more than a small task's
    whole run, so each running child gets a slot in one anonymous segment made with the
    pool.  A pickle that fits is written into the slot; a larger one goes to its own shm
    object and the slot holds its name.  Slot header: ``kind`` u64, ``spilled`` u64,
    ``length`` u64, ``done`` u64 (header plus length, written last, as above).
    """

    SLOT = 64 * 1024
    # kind, spilled, length, done: ``done`` last, so one pack_into stores it after the rest
    _SLOT_HEAD = struct.Struct("<QQQQ")
    _HEAD = _SLOT_HEAD.size
    _ROOM = SLOT - _HEAD
    _DONE_AT = 24

    def __init__(self, slots: int) -> None:
        from ..shm import SharedMemory

        self.slots = slots
        self._shm = SharedMemory(slots * self.SLOT)
        self._buf = self._shm.buf

    def prepare(self, slot: int) -> None:
        """Before the slot's task starts: mark the slot empty."""
        struct.pack_into("<Q", self._buf, slot * self.SLOT + self._DONE_AT, 0)

    def write(self, slot: int, kind: int, payload: Any, spill: str) -> None:
        """In the child: write outcome ``kind`` (RESULT or EXCEPTION) into ``slot``, spilling
        to ``spill`` if it does not fit.

        ``kind`` BEGIN writes nothing: the child calls it right before the task runs, so
        that :func:`result_buffer` knows the task's spill name.  Raises pickle errors (the
        caller then writes an exception outcome instead) and OSError (no room in /dev/shm).
        """
        global _task_spill, _reservation, _previous
        if kind == BEGIN:
            _begin(spill)
            return
        reservation = _reservation
        _task_spill = _reservation = None
        if reservation is None:
            if type(payload) in _PLAIN:  # the common small result: no buffers to look for
                data = _dumps(payload, 5)
                if len(data) <= self._ROOM:
                    base = slot * self.SLOT
                    self._buf[base + self._HEAD:base + self._HEAD + len(data)] = data
                    self._SLOT_HEAD.pack_into(self._buf, base, kind, 0, len(data),
                                              self._HEAD + len(data))  # done last
                    return
            self._write(slot, kind, payload, spill, None)
            return
        kept = False
        try:
            kept = self._write(slot, kind, payload, spill, reservation)
        finally:
            reservation.close(keep=kept)
            _previous = reservation if kept else None

    def _write(self, slot: int, kind: int, payload: Any, spill: str,
               reservation: Reservation | None) -> bool:
        """Write the outcome; True if ``reservation`` became its spill."""
        data, raws, flags = dump(payload, self._ROOM)
        spilled = kept = False
        if raws or len(data) > self._ROOM:
            into = None
            if reservation is not None and any(reservation.offset_of(r) is not None
                                               for r in raws):
                into, kept = reservation, True
            elif reservation is not None:
                reservation.close(keep=False)  # its name is the spill's: free it first
            write_spill(spill, kind, data, raws, flags, into)
            data, spilled = spill.encode(), True
        base = slot * self.SLOT
        head = base + self._HEAD
        self._buf[head:head + len(data)] = data
        self._SLOT_HEAD.pack_into(self._buf, base, kind, spilled, len(data),
                                  self._HEAD + len(data))  # done last: complete
        return kept

    def spilled(self, slot: int) -> bool:
        """In the parent, after the child ended: whether its outcome went to a spill."""
        _, spilled, _, done = self._SLOT_HEAD.unpack_from(self._buf, slot * self.SLOT)
        return bool(done and spilled)

    def read(self, slot: int) -> tuple[int, Any] | None:
        """In the parent, after the child ended: ``(kind, payload)``, or None if the slot
        (or its spill) is incomplete.  Raises what unpickling raises."""
        base = slot * self.SLOT
        kind, spilled, length, done = self._SLOT_HEAD.unpack_from(self._buf, base)
        head = self._HEAD
        if done != head + length or length > self._ROOM:
            return None
        # A copy (at most 64 KiB): no view of the arena may outlive this call, not even in
        # the traceback of a result that fails to load.
        data = bytes(self._buf[base + head:base + head + length])
        if spilled:
            return read_spill(data.decode())
        return kind, pickle.loads(data)

    def close(self) -> None:
        self._buf = memoryview(b"")
        self._shm.close()
