"""``MessageQueue(name, backend="dask")``: a dask ``Queue`` held in the scheduler.

Messages travel through the scheduler and wait in its memory: keep them small (a result
of many megabytes belongs in a dask future or in storage, with its key in the message).
Object mode pickles each object here (protocol 5) and sends the bytes; raw mode sends bytes
as they are.  The queue lives until :meth:`DaskQueue.unlink`, like a named local queue (a
dask Queue would vanish with its last handle; ours keep their reference to it).
Timeouts are measured in the scheduler; every timed-out wait makes the scheduler log an
error with a traceback (``distributed.core``): that is dask's doing, not a fault.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from .._common import check_count
from .._os.timeouts import check_timeout
from ..errors import (
    InvalidArgumentError,
    LimitExceededError,
    ObjectNotFoundError,
    QueueEmptyError,
    QueueFullError,
)
from ..mqueue import MessageQueue, raw_payload
from .client import (
    check_local_options,
    check_name,
    check_usable,
    cluster_key,
    require_distributed,
    resolve_client,
)

__all__ = ["DaskQueue"]

MAX_MESSAGES = 2**31 - 1


def _reopen_queue(name: str, raw: bool) -> DaskQueue:
    return DaskQueue(name, raw=raw)


class DaskQueue(MessageQueue):
    """A cluster-wide FIFO queue (``MessageQueue(name, backend="dask", raw=False,
    max_messages=None, max_message_size=None, client=None)``).

    ``max_messages`` bounds the queue (None: unbounded, unlike the local default of 10)
    and, like the local sizes, is fixed by the handle that creates it; ``max_message_size``
    (None: no limit) is checked by each handle on ``put`` (LimitExceededError).  SysV
    message types do not exist here: ``type`` must keep its default.  Pickling sends the
    name and mode only.
    """

    def __init__(self, name: str | None = None, *, backend: str = "dask", raw: bool = False,
                 max_messages: int | None = None, max_message_size: int | None = None,
                 client: Any = None, **options: Any) -> None:
        check_local_options("MessageQueue", options)
        self.name = check_name("MessageQueue", name)
        if max_messages is not None:
            check_count(max_messages, "max_messages", low=1, high=MAX_MESSAGES)
        if max_message_size is not None:
            check_count(max_message_size, "max_message_size", low=1, high=2**62)
        self.backend = "dask"
        self.raw = raw
        self.created = False  # not knowable: the scheduler makes it on first use
        self.max_message_size = max_message_size  # type: ignore[assignment]  # None: no limit
        self._what = f"MessageQueue {self.name!r} (dask)"
        self._limits = f"max_message_size={max_message_size}"
        self._closed = False
        self._pid = os.getpid()
        self._client = resolve_client(client)
        self._key = cluster_key("queue", self.name)
        distributed = require_distributed()
        self._queue = distributed.Queue(self._key, client=self._client,
                                        maxsize=max_messages or 0)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _reopen_queue, (self.name, self.raw)

    def __repr__(self) -> str:
        return f"<{self._what}{' closed' if self._closed else ''}>"

    def _check(self) -> None:
        check_usable(self._what, self._closed, self._pid)

    def _encode(self, obj: Any) -> bytes:
        data = raw_payload(obj, self._what) if self.raw else pickle.dumps(obj, protocol=5)
        if self.max_message_size is not None and len(data) > self.max_message_size:
            raise LimitExceededError(
                f"a message of {len(data)} bytes is too long for {self._what}",
                obj=self._what, backend="dask", limit=self._limits)
        return data

    def _decode(self, data: bytes) -> Any:
        return bytes(data) if self.raw else pickle.loads(data)

    @staticmethod
    def _check_type(type: int, default: int) -> None:
        if type != default:
            raise InvalidArgumentError("message types are for backend='sysv' only")

    def put(self, obj: Any, timeout: float | None = None, *, block: bool = True,
            type: int = 1) -> None:
        """Send ``obj`` (bytes in raw mode), waiting up to ``timeout`` s for room.  Raises
        QueueFullError if there is no room in time (or at once with ``block=False``),
        LimitExceededError past ``max_message_size``, InvalidArgumentError for bad
        arguments, ObjectNotFoundError once the queue was unlinked."""
        timeout = check_timeout(timeout)
        self._check_type(type, 1)
        self._check()
        data = self._encode(obj)
        try:
            self._queue.put(data, timeout=timeout if block else 0)
        except TimeoutError:
            raise QueueFullError(f"{self._what} stayed full for {timeout} s",
                                 obj=self._what, backend="dask", limit=self._limits) from None
        except KeyError:  # the scheduler no longer knows the queue
            raise self._gone() from None

    def get(self, timeout: float | None = None, *, block: bool = True, type: int = 0) -> Any:
        """Receive the next message, waiting up to ``timeout`` seconds.  Raises
        QueueEmptyError if nothing arrived in time (or at once with ``block=False``),
        ObjectNotFoundError once the queue was unlinked.  An interrupted blocking get
        (Ctrl-C) may still take the next message in the scheduler, and that message is
        lost: dask's queue cannot cancel a get it has begun."""
        timeout = check_timeout(timeout)
        self._check_type(type, 0)
        self._check()
        try:
            data = self._queue.get(timeout=timeout if block else 0)
        except TimeoutError:
            raise QueueEmptyError(f"{self._what} stayed empty for {timeout} s",
                                  obj=self._what, backend="dask",
                                  limit=self._limits) from None
        except KeyError:  # the scheduler no longer knows the queue
            raise self._gone() from None
        return self._decode(data)

    def _gone(self) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"{self._what} was unlinked", obj=self._what,
                                   backend="dask")

    def qsize(self) -> int:
        """How many messages wait in the queue (a snapshot)."""
        self._check()
        return int(self._queue.qsize())

    def close(self) -> None:
        """Drop this handle; the queue and its messages stay until :meth:`unlink`."""
        self._closed = True

    def unlink(self) -> None:
        """Remove the queue and its messages from the scheduler, whoever holds handles to
        it: their ``get``/``put`` raise ObjectNotFoundError from then on."""
        self._check()

        def drop(dask_scheduler: Any, name: str) -> bool:  # runs in the scheduler
            extension = dask_scheduler.extensions["queues"]
            found = extension.queues.pop(name, None) is not None
            extension.client_refcount.pop(name, None)
            return found

        self._client.run_on_scheduler(drop, name=self._key)
