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

import contextlib
import os
import pickle
import struct
import traceback
import types
from collections.abc import Callable
from typing import Any

from .child import EXIT_NO_OUTCOME, EXIT_OK, end_child, exception_payload, start_child
from .transfer import BEGIN, EXCEPTION, RESULT, OutcomeArena

__all__ = ["DEPTH", "call_pickled", "encode_call", "encode_task",
           "flush_outbox", "run_worker"]

DEPTH = 8  # tasks queued per worker: enough to keep it busy between parent rounds
_U32 = struct.Struct("<I")
_TASK_HEAD = struct.Struct("<II")  # slot, length of the spill name
_READ = 1 << 16  # bytes asked of the task pipe at a time (more when a message needs more)
_CACHE_SIZE = 128
_PICKLED: dict[Callable[..., Any], bytes] = {}  # in the parent: function -> its pickle
_LOADED: dict[bytes, Callable[..., Any]] = {}  # in a worker: pickle -> function


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
        _serve(_Inbox(task_r), arena, done_w, max_tasks)
        code = EXIT_OK
    except BaseException:
        traceback.print_exc()
    finally:
        end_child(code)


class _Inbox:
    """Task messages from the task pipe: one ``read`` takes every message the parent has
    queued (a buffered reader would take two calls per message, head and body)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def next(self) -> bytes | None:
        """The next message, blocking until it is whole; None at EOF (no more work)."""
        buf = self.buf
        while True:
            want = _U32.size - len(buf)
            if want <= 0:
                (length,) = _U32.unpack_from(buf, 0)
                want = _U32.size + length - len(buf)
                if want <= 0:
                    with memoryview(buf) as view:  # one copy (a bytearray slice is two)
                        message = bytes(view[_U32.size:_U32.size + length])
                    del buf[:_U32.size + length]  # from the front: O(1) for a bytearray
                    return message
            chunk = os.read(self.fd, max(want, _READ))
            if not chunk:
                return None
            buf += chunk


def _serve(inbox: _Inbox, arena: OutcomeArena, done_w: int, max_tasks: int | None) -> None:
    """Run task messages until EOF or ``max_tasks``: each outcome into its slot, then the
    slot's completion notice.  As :func:`~ipcfork.pool.child.run_call`, inlined: this loop
    is the whole per-task cost of a worker (about a third less than through the calls)."""
    write, notice, unpack = arena.write, _U32.pack, _TASK_HEAD.unpack_from
    done = 0
    while max_tasks is None or done < max_tasks:
        message = inbox.next()
        if not message:
            # The parent closed the pipe, or sent the empty message that means "stop": it
            # does both, as another process forked meanwhile may hold a copy of the pipe's
            # write end and keep the EOF from ever coming.
            return
        slot, length = unpack(message, 0)
        spill = message[8:8 + length].decode()
        write(slot, BEGIN, None, spill)
        try:
            kind, payload = RESULT, call_pickled(message, 8 + length)
        except Exception as exc:
            kind, payload = EXCEPTION, exception_payload(exc)
        try:
            write(slot, kind, payload, spill)
        except Exception as exc:  # unpicklable result: report it as the task's error
            if kind == EXCEPTION:
                raise
            write(slot, EXCEPTION, exception_payload(exc), spill)
        del payload  # before the notice: the task's objects go now, not with the next
        os.write(done_w, notice(slot))
        done += 1


def call_pickled(call: bytes, at: int = 0) -> Any:
    """Run a call encoded by :func:`encode_call` (from offset ``at`` of ``call``):
    unpickling errors become the task's error."""
    (fn_length,) = _U32.unpack_from(call, at)
    start = at + _U32.size
    if not fn_length:
        fn, args, kwargs = pickle.loads(memoryview(call)[start:])
        return fn(*args, **kwargs)
    fn_bytes = call[start:start + fn_length]
    fn = _LOADED.get(fn_bytes)
    if fn is None:
        if len(_LOADED) >= _CACHE_SIZE:
            _LOADED.clear()
        fn = _LOADED[fn_bytes] = pickle.loads(fn_bytes)
    args, kwargs = pickle.loads(memoryview(call)[start + fn_length:])
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
