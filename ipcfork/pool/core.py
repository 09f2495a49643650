"""What ForkPool's mode mixins (persistent workers, zygote) may rely on: the pool's shared
state and the few methods ``pool.py`` provides.  One declaration here instead of one per
mixin; ``ForkPool`` defines every attribute and overrides every method."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from .reaper import ChildWatch, Exit
from .tasks import Work
from .transfer import OutcomeArena

__all__ = ["PoolCore"]


class PoolCore:
    """The pool state and services the mixins use (see ``pool.ForkPool``)."""

    max_workers: int
    tasks_per_child: int | None
    timeout: float | None
    grace: float
    _pending: collections.deque[Work]
    _lock: threading.Lock
    _abort_signal: int | None
    _shutdown: bool
    _watch: ChildWatch
    _arena: OutcomeArena
    _free_slots: list[int]
    _parent: int
    _tag: str
    _initializer: Callable[..., Any] | None
    _initargs: tuple[Any, ...]

    def _load_allows_fork(self) -> bool:
        raise NotImplementedError

    def _next_startable(self, busy: int) -> Work | None:
        """The next queued task to start while ``busy`` tasks run, or None when the cap,
        the load guard (which never stops the first) or a stop says wait.  Cancelled
        futures are skipped; a retried task's future is running already and goes ahead."""
        while True:
            with self._lock:
                if (not self._pending or busy >= self.max_workers
                        or self._abort_signal is not None):
                    return None
                if busy and not self._load_allows_fork():
                    return None  # forks resume when the load drops or a child ends
                work = self._pending.popleft()
            if work.future.running() or work.future.set_running_or_notify_cancel():
                return work
            work.future.record.outcome = "cancelled"

    def _warn_about_threads(self) -> None:
        raise NotImplementedError

    def _child_setup(self) -> None:
        raise NotImplementedError

    def _read_slot(self, slot: int, spill: str) -> tuple[tuple[int, Any] | None,
                                                         BaseException | None]:
        raise NotImplementedError

    def _settle(self, work: Work, outcome: tuple[int, Any] | None,
                load_error: BaseException | None, *, exited: Exit | None,
                timed_out: bool) -> None:
        raise NotImplementedError
