"""ForkPool's options, checked once: every later part of the pool reads them from here."""

from __future__ import annotations

import math
import os
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._os.timeouts import check_timeout
from ..errors import InvalidArgumentError

__all__ = ["FD_RESERVE", "PoolOptions"]

FD_RESERVE = 64  # descriptors kept free for the caller when capping concurrency


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PoolOptions:
    """The checked options of one pool (see ``ForkPool`` for their meaning)."""

    max_workers: int
    tasks_per_child: int | None
    timeout: float | None
    grace: float
    retries: int
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    max_load: float | None
    handle_signals: bool
    forward_logs: bool
    zygote: bool
    hugepages: bool
    fork_safety_checks: bool

    @property
    def persistent(self) -> bool:
        return self.tasks_per_child != 1

    @classmethod
    def check(cls, max_workers: Any, *, tasks_per_child: Any, timeout: Any, grace: Any,
              retries: Any, initializer: Any, initargs: Any, max_load: Any,
              handle_signals: Any, forward_logs: Any, zygote: Any, hugepages: Any,
              fork_safety_checks: Any) -> PoolOptions:
        """Raises ValueError (InvalidArgumentError) naming the argument and its limit."""
        fd_cap = max(1, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE) // 2)
        if max_workers is None:
            max_workers = min(_default_workers(), fd_cap)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise InvalidArgumentError(
                f"max_workers must be an int in 1..{fd_cap}, not {max_workers!r}",
                limit=f"1..{fd_cap}")
        if max_workers <= 0:  # concurrent.futures' own words first: a drop-in Executor
            raise InvalidArgumentError(
                f"max_workers must be greater than 0 (got {max_workers})", limit=f"1..{fd_cap}")
        if max_workers > fd_cap:
            raise InvalidArgumentError(
                f"max_workers must be an int in 1..{fd_cap}, not {max_workers!r}",
                limit=f"1..{fd_cap} (half of RLIMIT_NOFILE less {FD_RESERVE})")
        if tasks_per_child is not None and (
                isinstance(tasks_per_child, bool) or not isinstance(tasks_per_child, int)
                or tasks_per_child < 1):
            raise InvalidArgumentError(
                f"tasks_per_child must be None or an int >= 1, not {tasks_per_child!r}",
                limit="None or >= 1")
        if zygote and tasks_per_child != 1:
            raise InvalidArgumentError("zygote=True forks a child per task: it needs "
                                       "tasks_per_child=1", limit="tasks_per_child == 1")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an int >= 0, not {retries!r}")
        if max_load is not None and (isinstance(max_load, bool) or not isinstance(
                max_load, (int, float)) or not math.isfinite(max_load)):
            # Below 0 is allowed: the load is never under it, so one task runs at a time.
            raise InvalidArgumentError(
                f"max_load must be None or a finite number (a 1-minute load average), "
                f"not {max_load!r}", limit="finite")
        if initializer is not None and not callable(initializer):
            raise InvalidArgumentError("initializer must be callable")
        main = threading.current_thread() is threading.main_thread()
        if handle_signals is None:
            handle_signals = main
        elif handle_signals and not main:
            raise InvalidArgumentError("handle_signals=True needs the main thread: Python "
                                       "runs signal handlers there only")
        return cls(max_workers=max_workers, tasks_per_child=tasks_per_child,
                   timeout=check_timeout(timeout, "timeout"),
                   grace=check_timeout(grace, "grace") or 0.0, retries=retries,
                   initializer=initializer, initargs=tuple(initargs), max_load=max_load,
                   handle_signals=bool(handle_signals), forward_logs=bool(forward_logs),
                   zygote=bool(zygote), hugepages=bool(hugepages),
                   fork_safety_checks=bool(fork_safety_checks))
