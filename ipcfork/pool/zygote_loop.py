"""The zygote (``ForkPool(zygote=True)``): a small helper forked when the pool is made, before
the parent grows threads or a large heap, that forks every task's child from itself.

Why: ``fork`` copies the page tables of the process that forks, so its cost grows with the
parent's heap (a plain fork cycle was ~9x slower from a 500 MB parent than from a small one),
and a parent with threads risks children that deadlock on a lock some thread held.  The
zygote stays small and single-threaded, so every task's fork is cheap and safe.  The price:
the call is pickled to reach the zygote, as with persistent workers.

Wire (both directions framed, little-endian):

    parent -> zygote:  kind (1 byte), u32 length, body:
                       b"T": encode_task(slot, spill, fn, args, kwargs)   (run a task)
                       b"K": u32 slot, u32 signal        (signal the task in that slot)
                       b"Q": empty                       (finish: no more commands)
    zygote -> parent:  EVENT records of fixed size (atomic pipe writes):
                       b"S" slot, pid                    (the task's child was forked)
                       b"F" slot, errno                  (its fork failed: no child of the
                                                         zygote ran to wait for)
                       b"E" slot, pid, exit code, signal, max RSS, user and system CPU

A ``Q`` frame (and closing the command pipe) tells the zygote to finish: it waits for its
children, reports them, and exits.  The frame is what counts: a process forked since (a
task of another pool, say) may hold a copy of the write end, so the EOF may never come.
Every child asks for ``PR_SET_PDEATHSIG`` against the zygote and the zygote against the
parent's manager thread, so a dying parent takes the whole tree along.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .child import EXIT_NO_OUTCOME, EXIT_OK, end_child, run_task_in_child, start_child
from .reaper import Exit, reap
from .transfer import OutcomeArena
from .worker_loop import call_pickled

__all__ = ["EVENT", "QUIT_COMMAND", "ZygoteEvent", "kill_command", "parse_events", "run_zygote",
           "task_command"]

EVENT = struct.Struct("<cIIiiQdd")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class ZygoteEvent:
    """A task's child started (``kind == "S"``) or ended (``"E"``, with ``exit``)."""

    kind: str
    slot: int
    pid: int
    exit: Exit | None


def parse_events(data: bytes) -> tuple[list[ZygoteEvent], bytes]:
    """Whole events in ``data`` and the bytes left over."""
    whole = len(data) - len(data) % EVENT.size
    events = []
    for kind, slot, pid, code, sig, rss, utime, stime in EVENT.iter_unpack(data[:whole]):
        ended = None
        if kind == b"E":
            ended = Exit(pid, code if code >= 0 else None, sig or None, rss, utime, stime)
        events.append(ZygoteEvent(kind.decode(), slot, pid, ended))
    return events, data[whole:]


def task_command(message: bytes) -> bytes:
    """The frame that asks the zygote to run a task (``message`` from ``encode_task``)."""
    return b"T" + _U32.pack(len(message)) + message


QUIT_COMMAND = b"Q" + _U32.pack(0)


def kill_command(slot: int, signum: int) -> bytes:
    """The frame that asks the zygote to signal the task running in ``slot``."""
    return b"K" + _U32.pack(8) + struct.pack("<II", slot, signum)


def run_zygote(
    parent_pid: int,
    cmd_r: int,
    event_w: int,
    arena: OutcomeArena,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    setup: Callable[[], None] | None,
) -> None:
    """The zygote's loop; ``_exit``s, never returns."""
    code = EXIT_NO_OUTCOME
    try:
        # The zygote's own setup is only die-with-parent and signals; the log setup runs in
        # each task's child (it needs the socket the parent reads).
        start_child(parent_pid, None)
        _Zygote(cmd_r, event_w, arena, initializer, initargs, setup).serve()
        code = EXIT_OK
    except BaseException:
        traceback.print_exc()
    finally:
        end_child(code)


class _Zygote:
    def __init__(self, cmd_r: int, event_w: int, arena: OutcomeArena,
                 initializer: Callable[..., Any] | None, initargs: tuple[Any, ...],
                 setup: Callable[[], None] | None) -> None:
        self.cmd_r, self.event_w, self.arena = cmd_r, event_w, arena
        self.initializer, self.initargs, self.setup = initializer, initargs, setup
        self.poll = select.poll()
        self.poll.register(cmd_r, select.POLLIN)
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, slot)
        self.by_slot: dict[int, int] = {}
        self.buffer = bytearray()
        self.deferred: collections.deque[bytes] = collections.deque()  # refused forks
        self.quit = False
        self.me = os.getpid()

    def serve(self) -> None:
        open_commands = True
        while (open_commands and not self.quit) or self.children or self.deferred:
            for fd, _ in self.poll.poll():
                if fd == self.cmd_r:
                    data = os.read(self.cmd_r, 1 << 16)
                    if not data:
                        open_commands = False
                        self.poll.unregister(fd)
                        # The parent closes early only when it stops the pool: a task
                        # still waiting for its fork must not start now.
                        self.deferred.clear()
                    self.buffer += data
                    self._commands()
                else:
                    self._ended(fd)

    def _commands(self) -> None:
        # One pass over the buffer with an offset, then one deletion: linear in its size
        # even when a large task arrives in many reads.
        buffer, at = self.buffer, 0
        while len(buffer) - at >= 5:
            kind, (length,) = bytes(buffer[at:at + 1]), _U32.unpack_from(buffer, at + 1)
            if len(buffer) - at < 5 + length:
                break
            body = bytes(buffer[at + 5:at + 5 + length])
            at += 5 + length
            if kind == b"Q":  # stop, as at EOF (see run_zygote's docstring)
                self.quit = True
                self.deferred.clear()
            elif kind == b"K":
                slot, signum = struct.unpack("<II", body)
                pid = self.by_slot.get(slot)
                if pid is not None:  # not yet reaped by us, so the pid is still this child
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
                else:
                    self._drop_deferred(slot, signum)
            elif self.deferred or not self._fork(body):
                self.deferred.append(body)  # behind the tasks already waiting for a fork
        del buffer[:at]

    def _drop_deferred(self, slot: int, signum: int) -> None:
        """A signal for a task still waiting for its fork: it never runs; report it ended
        by that signal (pid 0: it had no process)."""
        for message in list(self.deferred):
            if _U32.unpack_from(message, 0)[0] == slot:
                self.deferred.remove(message)
                os.write(self.event_w, EVENT.pack(b"E", slot, 0, -1, signum, 0, 0.0, 0.0))

    def _fork(self, message: bytes) -> bool:
        """Fork the child of one task message; False if the fork was refused."""
        (slot,) = _U32.unpack_from(message, 0)
        (length,) = _U32.unpack_from(message, 4)
        spill = message[8:8 + length].decode()
        call = message[8 + length:]
        arena = self.arena

        def write(kind: int, payload: Any) -> None:
            arena.write(slot, kind, payload, spill)

        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOMEM) and self.children:
                # Out of processes or memory for now: one of our children will end and
                # free what we need; the task waits at the front until then.
                return False
            # Nothing of ours to wait for: the task fails, the zygote lives on.
            os.write(self.event_w, EVENT.pack(b"F", slot, exc.errno or 0, 0, 0, 0, 0.0, 0.0))
            return True  # handled: reported to the parent
        if pid == 0:
            run_task_in_child(self.me, write, call_pickled, (call,), {}, self.initializer,
                              self.initargs, self.setup)
        fd = os.pidfd_open(pid)
        self.children[fd] = (pid, slot)
        self.by_slot[slot] = pid
        self.poll.register(fd, select.POLLIN)
        os.write(self.event_w, EVENT.pack(b"S", slot, pid, 0, 0, 0, 0.0, 0.0))
        return True

    def _ended(self, fd: int) -> None:
        pid, slot = self.children.pop(fd)
        self.poll.unregister(fd)
        os.close(fd)
        self.by_slot.pop(slot, None)
        ended = reap(pid)
        code = -1 if ended.exitcode is None else ended.exitcode
        os.write(self.event_w, EVENT.pack(b"E", slot, pid, code, ended.signal or 0,
                                          ended.maxrss_kib, ended.utime, ended.stime))
        # A child ended, so a refused fork may succeed now: retry those waiting, in order.
        while self.deferred and self._fork(self.deferred[0]):
            self.deferred.popleft()
