"""What ForkPool's mode mixins (persistent workers, zygote) may rely on: the pool's shared
state and the few methods ``pool.py`` provides.  One declaration here instead of one per
mixin; ``ForkPool`` defines every attribute and overrides every method."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from ._reaper import ChildWatch, Exit
from ._tasks import Work
from ._transfer import OutcomeArena

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
