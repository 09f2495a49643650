"""How a signal's stop passes between the pool's signal handler and the manager thread.

The handler (``signals``) runs in the main thread, in the middle of whatever that thread
was doing, and waits there until the manager has killed and reaped every child.  The code
it interrupted may hold a future's lock: ``Future.exception()`` holds it between its checks
and its wait, which is exactly where a Ctrl-C pressed as the program starts waiting lands.
A manager resolving that future meanwhile would wait for the lock while the handler waits
for the manager, and nothing would move until the handler's bound ran out.

So while a handler waits, the manager resolves no future itself: it hands each resolution
to the handler (:meth:`StopHandoff.settle`), which runs them in the interrupted thread once
the children are reaped.  A Future's lock is reentrant, so that thread may take it again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable

from .tasks import StreamTask, TaskFuture

__all__ = ["StopHandoff"]

_LOG = logging.getLogger("ipcfork.pool")
_PROBE = 0.01  # seconds between looks at a stop while a future's lock is held elsewhere


class StopHandoff:
    """The meeting point of one pool's signal handler and its manager thread."""

    def __init__(self) -> None:
        # Resolutions held for the waiting handler; None while no handler waits.  Only
        # atomic deque operations and attribute stores touch it (the GIL orders them).
        self.held: collections.deque[Callable[[], None]] | None = None
        # Set by the manager once a stop's children are all reaped, or its loop ended.
        self.reaped = threading.Event()
        self.waiting = False

    # -- the handler's side ---------------------------------------------------------------

    def begin_wait(self) -> bool:
        """Start holding resolutions for this handler.  False if another handler of the
        same stop waits already (a second Ctrl-C): then there is nothing to wait for here."""
        if self.waiting:
            return False
        self.waiting = True
        self.held = collections.deque()
        return True

    def end_wait(self) -> None:
        """Stop holding, and run what was held, in order, in the calling thread."""
        held, self.held = self.held, None
        try:
            while held:
                try:
                    action = held.popleft()
                except IndexError:  # the manager took its last one back
                    break
                try:
                    action()
                except BaseException:  # user code (a done-callback): the rest still runs
                    _LOG.exception("resolving a task at a stop raised")
        finally:
            self.waiting = False

    # -- the manager's side ---------------------------------------------------------------

    def settle(self, future: TaskFuture | StreamTask, action: Callable[[], None]) -> None:
        """Run ``action``, which resolves or cancels ``future``, now; or hand it to the
        waiting handler if a stop has begun, even while we waited for the future's lock."""
        while True:
            held = self.held
            if held is None:
                if self.free(future):
                    action()
                    return
                continue  # held elsewhere, and a stop has begun meanwhile
            held.append(action)
            if self.held is not held:  # the handler ran what was held before our append
                with contextlib.suppress(ValueError):  # ValueError: it ran ours too
                    held.remove(action)
                    action()
            return

    def free(self, future: TaskFuture | StreamTask) -> bool:
        """True once ``future``'s lock is free; False as soon as a handler waits for a stop
        (the lock may then be held by the very thread that handler interrupted)."""
        if not isinstance(future, TaskFuture):  # a StreamTask has no lock
            return self.held is None
        while self.held is None:
            if future.lock_free_within(_PROBE):
                return True
        return False
