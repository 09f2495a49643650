"""Persistent forked workers (``tasks_per_child=None`` or ``N``): the wire and the worker loop.

A worker is forked by the pool's manager thread and then runs task after task:

    parent ──task pipe──> worker:  u32 length, u32 slot, spill name, the call (encode_call)
    worker ──done pipe──> parent:  u32 slot, once the outcome is complete in that slot

Outcomes go through the pool's :class:`~ipcfork.pool.transfer.OutcomeArena` exactly as in
fork-per-task mode (large ones spill to their own shm object), so the pipes carry only the
task and a 4-byte completion notice.  Each worker owns ``DEPTH`` slots, so the parent can queue
the next task while one runs and the worker never waits for the parent between tasks.  The
parent reads a slot only after its notice arrived, and gives the slot to a new task only
after reading it: no slot is ever written and read at once.

Unlike fork-per-task mode, the callable and its arguments are pickled here.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import struct
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .child import EXIT_NO_OUTCOME, EXIT_OK, end_child, run_call, start_child
from .transfer import OutcomeArena

__all__ = ["DEPTH", "InFlight", "Worker", "call_pickled", "encode_call", "encode_task",
           "flush_outbox", "run_worker"]

DEPTH = 8  # tasks queued per worker: enough to keep it busy between parent rounds
_U32 = struct.Struct("<I")
_CACHE_SIZE = 128
_PICKLED: dict[Callable[..., Any], bytes] = {}  # in the parent: function -> its pickle
_LOADED: dict[bytes, Callable[..., Any]] = {}  # in a worker: pickle -> function


@dataclass
class InFlight:
    """A task sent to a worker and not yet resolved."""

    work: Any  # a _tasks.Work (kept untyped here to avoid an import cycle)
    slot: int
    spill: str
    started: float | None = None  # when it became the worker's running task
    deadline: float | None = None


@dataclass
class Worker:
    """The parent's view of one persistent worker."""

    pid: int
    task_w: int
    done_r: int
    slots: list[int]
    sent: int = 0
    inflight: collections.deque[InFlight] = field(default_factory=collections.deque)
    pending_bytes: bytes = b""
    outbox: bytearray = field(default_factory=bytearray)
    terminated_at: float | None = None
    timed_out: InFlight | None = None  # the task whose timeout made us terminate the worker
    closed: bool = False

    def queue(self, message: bytes) -> None:
        """Add one task to the outbox; :meth:`flush` writes it."""
        self.outbox += _U32.pack(len(message))
        self.outbox += message

    def flush(self) -> bool:
        """Write queued bytes without blocking; True if some are left.  A worker that is
        gone drops them (its exit settles its tasks)."""
        return flush_outbox(self.task_w, self.outbox)

    def read_notices(self) -> list[int]:
        """The slots whose outcomes completed, from what the done pipe holds now."""
        chunks = [self.pending_bytes]
        with contextlib.suppress(BlockingIOError):
            while True:
                chunk = os.read(self.done_r, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
        data = b"".join(chunks)
        whole = len(data) - len(data) % _U32.size
        self.pending_bytes = data[whole:]
        return [slot for (slot,) in _U32.iter_unpack(data[:whole])]

    def stop(self) -> None:
        """Close the task pipe: the worker ends after its current tasks (EOF)."""
        if not self.closed:
            self.closed = True
            os.close(self.task_w)

    def close(self) -> None:
        self.stop()
        os.close(self.done_r)


def flush_outbox(fd: int, outbox: bytearray) -> bool:
    """Write as much of ``outbox`` to the non-blocking ``fd`` as it takes now, removing what
    was written; True if bytes remain.  A closed reader empties it (nobody will read)."""
    try:
        while outbox:
            written = os.write(fd, outbox)
            del outbox[:written]
    except BlockingIOError:
        return True
    except OSError:  # EPIPE, EBADF: the reader is gone
        outbox.clear()
    return False


def run_worker(
    parent_pid: int,
    task_r: int,
    done_w: int,
    arena: OutcomeArena,
    max_tasks: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    close_fds: list[int],
    setup: Callable[[], None] | None = None,
) -> None:
    """The worker's loop; ``_exit``s, never returns."""
    code = EXIT_NO_OUTCOME
    try:
        start_child(parent_pid, setup)
        for fd in close_fds:  # other workers' pipe ends: their EOFs must not wait on us
            with contextlib.suppress(OSError):
                os.close(fd)
        if initializer is not None:
            initializer(*initargs)
        reader = os.fdopen(task_r, "rb")
        done = 0
        while max_tasks is None or done < max_tasks:
            head = reader.read(_U32.size)
            if len(head) < _U32.size:
                break  # the parent closed the pipe: no more work
            message = reader.read(_U32.unpack(head)[0])
            _run_one(message, arena, done_w)
            done += 1
        code = EXIT_OK
    except BaseException:
        traceback.print_exc()
    finally:
        end_child(code)


def call_pickled(call: bytes) -> Any:
    """Run a call encoded by :func:`encode_call`: unpickling errors become the task's
    error."""
    (fn_length,) = _U32.unpack_from(call, 0)
    if not fn_length:
        fn, args, kwargs = pickle.loads(memoryview(call)[4:])
        return fn(*args, **kwargs)
    fn_bytes = call[4:4 + fn_length]
    fn = _LOADED.get(fn_bytes)
    if fn is None:
        if len(_LOADED) >= _CACHE_SIZE:
            _LOADED.clear()
        fn = _LOADED[fn_bytes] = pickle.loads(fn_bytes)
    args, kwargs = pickle.loads(memoryview(call)[4 + fn_length:])
    return fn(*args, **kwargs)


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """``u32 n``, then ``n`` bytes of pickled function and the pickled ``(args, kwargs)``;
    or ``n = 0`` and the whole call in one pickle.

    A plain function pickles as a reference (its module and name) that is the same every
    time, so both sides cache it: most tasks of a ``map`` pickle and load only their
    arguments.  Other callables (bound methods, partials) go in one pickle with the
    arguments, so objects shared between them stay shared.  Raises what pickling raises.
    """
    if _pickles_by_name(fn):
        fn_bytes = _PICKLED.get(fn)
        if fn_bytes is None:
            if len(_PICKLED) >= _CACHE_SIZE:
                _PICKLED.clear()
            fn_bytes = _PICKLED[fn] = pickle.dumps(fn, protocol=5)
        return _U32.pack(len(fn_bytes)) + fn_bytes + pickle.dumps((args, kwargs), protocol=5)
    return _U32.pack(0) + pickle.dumps((fn, args, kwargs), protocol=5)


def _pickles_by_name(fn: Callable[..., Any]) -> bool:
    """A Python function, or a builtin of a module (``abs``, ``math.sqrt``): pickled as a
    name, the same bytes every time.  Not a bound method of a C object (``data.count``):
    that pickles its object, whose state may change between two tasks."""
    if type(fn) is types.FunctionType:
        return True
    if type(fn) is types.BuiltinFunctionType:
        owner = getattr(fn, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    return False


def encode_task(slot: int, spill: str, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> bytes:
    """The task message after its length: slot, spill name, then the encoded call.

    Raises what pickling raises (a lambda, an open file...): the task then fails at once.
    """
    name = spill.encode()
    return _U32.pack(slot) + _U32.pack(len(name)) + name + encode_call(fn, args, kwargs)


def _run_one(message: bytes, arena: OutcomeArena, done_w: int) -> None:
    """Run one task message and post its completion notice."""
    (slot,) = _U32.unpack_from(message, 0)
    (length,) = _U32.unpack_from(message, 4)
    spill = message[8:8 + length].decode()

    def write(kind: int, payload: Any) -> None:
        arena.write(slot, kind, payload, spill)

    run_call(write, call_pickled, (message[8 + length:],), {})
    os.write(done_w, _U32.pack(slot))
