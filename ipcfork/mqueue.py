"""Message queues (POSIX or SysV) that carry Python objects of any size, or raw bytes.

Object mode pickles each object (protocol 5).  A pickle too large for one kernel message
(POSIX: ``max_message_size``, 8192 here; SysV: MSGMAX, 8192 here) is *spilled*: written to
a fresh POSIX shared memory object whose name travels in the message, then read and unlinked
by the receiver, so results never depend on the kernel's message limits.  Spill names carry
the queue creator's pid, so ``ipcfork clean`` can find the spills of a family that died.

Raw mode (``raw=True``) sends bytes as they are, one kernel message each, for programs in
other languages (PHP's ``msg_send``/``msg_receive`` with ``serialize=false``); a message past
the kernel limit raises LimitExceededError instead of spilling.

Timeouts: POSIX queues wait in the kernel (``mq_timedsend``/``mq_timedreceive``, called
through ctypes so a signal handler's exception is not swallowed as posix_ipc would).  SysV has
no timed send or receive; a timed SysV call retries a non-blocking call with back-off
(0.5 ms doubling to 5 ms), so it wakes within 5 ms of a message; an untimed one blocks in
the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import time
from typing import Any

import posix_ipc
import sysv_ipc

from ._common import (
    ClosingContext,
    check_count,
    describe,
    kernel_limit,
    on_creator_exit,
    sysv_key_for,
)
from ._os import registry as _registry
from ._os.identity import IDENTITY
from ._os.libc import WAIT_DONE, WAIT_INTERRUPTED, WAIT_TIMEOUT, mq_timedreceive, mq_timedsend
from ._os.names import POSIX_PREFIX
from ._os.opening import create_or_open
from ._os.posix import resolve_posix_name, unlink_posix
from ._os.security import CREATE_MODE, check_owner
from ._os.sysv import MSGMAX, open_sysv_queue, remove_sysv
from ._os.timeouts import Deadline, check_timeout
from ._os.translate import translate_exception, translating
from ._spill import dump, read_spill, write_spill
from .errors import (
    InvalidArgumentError,
    LimitExceededError,
    ObjectNotFoundError,
    QueueEmptyError,
    QueueFullError,
)

__all__ = ["MessageQueue", "raw_payload"]

_INLINE = b"\x00"
_SPILL = b"\x01"
_BACKOFF_START = 0.0005
_BACKOFF_MAX = 0.005


def raw_payload(obj: Any, what: str) -> bytes:
    """``obj`` as the bytes of one raw message.  Raises InvalidArgumentError unless it is
    bytes-like."""
    if not isinstance(obj, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"a raw {what} sends bytes, not {type(obj).__name__}")
    return bytes(obj)

class MessageQueue(ClosingContext):
    """A queue of messages between processes.

    ``MessageQueue()`` is anonymous (share it through ``fork``); ``name`` works as for
    :class:`Semaphore`.  POSIX queues are sized by ``max_messages`` (default 10) and
    ``max_message_size`` (default 8192), both fixed at creation; SysV queues by the kernel's
    MSGMNB (bytes per queue).

    Raises InvalidArgumentError for bad sizes or names and as :class:`Semaphore` does for
    foreign or missing objects.
    """

    def __new__(cls, *args: Any, backend: str = "posix", **options: Any) -> MessageQueue:
        if cls is MessageQueue and backend == "dask":  # ipcfork.dask: imported on first use
            from .dask.queue import DaskQueue

            return object.__new__(DaskQueue)
        return object.__new__(cls)

    def __init__(
        self,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        raw: bool = False,
        max_messages: int | None = None,
        max_message_size: int | None = None,
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        key = sysv_key_for(name, proj, backend)
        self.backend = backend
        self.raw = raw
        self.name = None if name is None else os.fspath(name)
        self._what = describe("MessageQueue", name, backend)
        self._creator = IDENTITY.pid
        self._closed = False
        self._buffer: ctypes.Array[ctypes.c_char] | None = None
        if backend == "posix":
            if name is not None and not isinstance(name, str):
                raise InvalidArgumentError(f"a POSIX name must be a str, not {name!r}")
            self._open_posix(name, max_messages, max_message_size, create=create,
                             exclusive=exclusive, allow_foreign=allow_foreign)
        else:
            if max_messages is not None or max_message_size is not None:
                raise InvalidArgumentError(
                    "SysV queues are sized by the kernel (MSGMNB, MSGMAX); "
                    "max_messages and max_message_size are for backend='posix'")
            self._queue, self.created = open_sysv_queue(
                key, create=create, exclusive=exclusive, allow_foreign=allow_foreign,
                what=self._what)
            self.max_message_size = MSGMAX
            self._queue.max_size  # noqa: B018  (fails early if the queue is unusable)
            self._limits = (f"MSGMAX={self.max_message_size} bytes a message, "
                            f"MSGMNB={self._queue.max_size} bytes a queue")
        # The finalizer gets the raw queue, never self: a reference to self would keep the
        # queue alive forever and the finalizer would only run at exit.
        self._finalizer = on_creator_exit(self, _drop_anonymous, self._queue, self.backend,
                                          self.raw, self._what)
        if not (self.name is None and self.created):
            self._finalizer.detach()

    def _open_posix(self, name: str | None, max_messages: int | None,
                    max_message_size: int | None, *, create: bool, exclusive: bool,
                    allow_foreign: bool) -> None:
        msg_max = kernel_limit("/proc/sys/fs/mqueue/msg_max", 10)
        size_max = kernel_limit("/proc/sys/fs/mqueue/msgsize_max", 8192)
        if max_messages is not None:
            check_count(max_messages, "max_messages", low=1, high=msg_max)
        if max_message_size is not None:
            check_count(max_message_size, "max_message_size", low=16, high=size_max)
        self._posix_name, anonymous = resolve_posix_name(name, "mq")
        queue, self.created = create_or_open(
            lambda: posix_ipc.MessageQueue(
                self._posix_name, posix_ipc.O_CREX, mode=CREATE_MODE,
                max_messages=max_messages or min(10, msg_max),
                max_message_size=max_message_size or min(8192, size_max)),
            lambda: posix_ipc.MessageQueue(self._posix_name, 0),
            creating=create or anonymous, exclusive=exclusive or anonymous, what=self._what,
            backend="posix")
        if self.created:
            os.fchmod(queue.mqd, CREATE_MODE)
            if not anonymous:
                _registry.remember("posix", "queue", self._posix_name)
        else:
            st = os.fstat(queue.mqd)
            try:
                check_owner(st.st_uid, st.st_mode, self._what, "posix",
                            allow_foreign=allow_foreign)
            except BaseException:
                queue.close()
                raise
        if anonymous:
            queue.unlink()
        os.set_inheritable(queue.mqd, False)
        self._queue = queue
        self.max_message_size = int(queue.max_message_size)
        self._limits = (f"max_messages={queue.max_messages}, "
                        f"max_message_size={self.max_message_size} bytes")

    def __repr__(self) -> str:
        mode = "raw" if self.raw else "objects"
        return f"<MessageQueue {self._what} {mode}>"

    # -- encoding -----------------------------------------------------------------------

    def _encode(self, obj: Any) -> bytes:
        if self.raw:
            data = raw_payload(obj, self._what)
            if len(data) > self.max_message_size:
                raise LimitExceededError(
                    f"a raw message of {len(data)} bytes is too long for {self._what}",
                    obj=self._what, backend=self.backend, limit=self._limits)
            return data
        data, raws, flags = dump(obj, self.max_message_size - 1)
        if not raws and len(data) + 1 <= self.max_message_size:
            return _INLINE + data
        # Too large for one message: a spill (the format ForkPool's outcomes use too).
        name = f"/{POSIX_PREFIX}{self._creator}.spill.{os.urandom(8).hex()}"
        with translating(f"spill of {self._what}", "posix", "create"):
            write_spill(name, 0, data, raws, flags)
        return _SPILL + name.encode()

    def _decode(self, data: bytes) -> Any:
        if self.raw:
            return data
        kind, body = data[:1], data[1:]
        if kind != _SPILL:
            return pickle.loads(body)
        name = body.decode()
        spilled = read_spill(name)
        if spilled is None:
            raise ObjectNotFoundError(f"the spill of a message in {self._what} ({name}) is "
                                      "missing or incomplete", obj=self._what, backend="posix")
        return spilled[1]

    def _discard(self, data: bytes) -> None:
        """Free the spill a message that was never delivered points to."""
        _free_spill(data, self.raw)

    # -- put / get ------------------------------------------------------------------------

    def put(self, obj: Any, timeout: float | None = None, *, block: bool = True,
            type: int = 1) -> None:
        """Send ``obj`` (bytes in raw mode), waiting up to ``timeout`` s for room.

        ``type`` is the SysV message type (> 0).  Raises QueueFullError if there is no room
        in time (or at once with ``block=False``), LimitExceededError for a raw message past
        the kernel limit, InvalidArgumentError for bad arguments.
        """
        timeout = check_timeout(timeout)
        if self.backend == "sysv":
            check_count(type, "message type", low=1, high=2**31 - 1)
        data = self._encode(obj)
        try:
            sent = self._send(data, 0.0 if not block else timeout, type)
        except BaseException:
            self._discard(data)
            raise
        if not sent:
            self._discard(data)
            raise QueueFullError(f"{self._what} stayed full for {timeout} s",
                                 obj=self._what, backend=self.backend, limit=self._limits)

    def put_nowait(self, obj: Any) -> None:
        """Send ``obj`` only if there is room now; QueueFullError otherwise."""
        self.put(obj, block=False)

    def get(self, timeout: float | None = None, *, block: bool = True, type: int = 0) -> Any:
        """Receive the next message, waiting up to ``timeout`` seconds.

        ``type`` (SysV only) selects messages as ``msgrcv`` does (0: any).  Raises
        QueueEmptyError if nothing arrived in time (or at once with ``block=False``).
        """
        timeout = check_timeout(timeout)
        data = self._receive(0.0 if not block else timeout, type)
        if data is None:
            raise QueueEmptyError(f"{self._what} stayed empty for {timeout} s",
                                  obj=self._what, backend=self.backend, limit=self._limits)
        return self._decode(data)

    def get_nowait(self) -> Any:
        """Receive a message only if one is there now; QueueEmptyError otherwise."""
        return self.get(block=False)

    def qsize(self) -> int:
        """How many messages wait in the queue (a snapshot)."""
        with translating(self._what, self.backend, "qsize"):
            return int(self._queue.current_messages)

    def _send(self, data: bytes, timeout: float | None, mtype: int) -> bool:
        queue = self._queue
        if self.backend == "posix":
            deadline = Deadline(timeout)
            while True:
                try:
                    outcome = mq_timedsend(queue.mqd, data, deadline.remaining())
                except OSError as exc:
                    raise translate_exception(exc, self._what, "posix", "put") from exc
                if outcome != WAIT_INTERRUPTED:  # EINTR: the handler ran; go on if it let us
                    return outcome == WAIT_DONE
        return self._sysv_call(lambda block: queue.send(data, block, mtype), timeout, "put")

    def _receive(self, timeout: float | None, mtype: int) -> bytes | None:
        queue = self._queue
        if self.backend == "posix":
            if self._buffer is None:
                self._buffer = ctypes.create_string_buffer(self.max_message_size)
            deadline = Deadline(timeout)
            while True:
                try:
                    outcome, size = mq_timedreceive(queue.mqd, self._buffer, deadline.remaining())
                except OSError as exc:
                    raise translate_exception(exc, self._what, "posix", "get") from exc
                if outcome == WAIT_DONE:
                    return ctypes.string_at(self._buffer, size)  # copies only the message
                if outcome == WAIT_TIMEOUT:
                    return None
        result: list[bytes] = []

        def attempt(block: bool) -> None:
            message, _ = queue.receive(block, mtype)
            result.append(bytes(message))

        return result[0] if self._sysv_call(attempt, timeout, "get") else None

    def _sysv_call(self, call: Any, timeout: float | None, op: str) -> bool:
        deadline = Deadline(timeout)
        pause = _BACKOFF_START
        while True:
            try:
                call(timeout is None)
                return True
            except sysv_ipc.BusyError:
                if timeout is None:
                    continue
            except sysv_ipc.Error as exc:
                if "Signaled" not in str(exc):
                    raise translate_exception(exc, self._what, "sysv", op) from exc
                continue
            except (OSError, ValueError) as exc:
                raise translate_exception(exc, self._what, "sysv", op) from exc
            remaining = deadline.remaining()
            if not remaining:
                return False
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, _BACKOFF_MAX)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this process's handle (an anonymous SysV queue is removed by its creator)."""
        if self._closed:
            return
        self._finalizer()
        if self.backend == "posix":
            self._queue.close()
        self._closed = True

    def unlink(self) -> None:
        """Remove the queue system-wide, freeing the spills of messages never received.

        Raises ObjectNotFoundError if it is already gone.
        """
        self._drain()
        if self.backend == "sysv":
            remove_sysv(self._queue, "queue", self._what)
        elif self.name is not None:
            unlink_posix("queue", self._posix_name, self._what)

    def _drain(self) -> None:
        _drain_raw(self._queue, self.backend, self.raw)


def _free_spill(data: bytes, raw: bool) -> None:
    if not raw and data[:1] == _SPILL:
        with contextlib.suppress(posix_ipc.Error):
            posix_ipc.unlink_shared_memory(data[1:].decode().split("\n")[0])


def _drain_raw(queue: Any, backend: str, raw: bool) -> None:
    """Take every waiting message off ``queue`` without blocking, freeing its spill."""
    with contextlib.suppress(Exception):
        while True:
            try:
                if backend == "posix":
                    data, _ = queue.receive(0)
                else:
                    data, _ = queue.receive(False)
            except (posix_ipc.BusyError, sysv_ipc.BusyError):
                return
            _free_spill(bytes(data), raw)


def _drop_anonymous(queue: Any, backend: str, raw: bool, what: str) -> None:
    """At the creator's end: free undelivered spills; remove an anonymous SysV queue."""
    _drain_raw(queue, backend, raw)
    if backend == "sysv":
        with contextlib.suppress(Exception):
            remove_sysv(queue, "queue", what)
