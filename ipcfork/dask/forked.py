"""``forked(fn, timeout=None)``: run a dask task in a fork of its worker, with ForkPool's
guarantees.

The wrapped task forks a child on the dask worker (one child per call, through a
:class:`~ipcfork.ForkPool` kept per worker process and per timeout), runs ``fn`` there and
returns its result.  A child that segfaults, calls ``os._exit`` or is killed fails the task
with ChildCrashedError; one that outlives ``timeout`` is terminated (SIGTERM, then SIGKILL
after ``grace``) and the task fails with TaskTimeoutError.  The dask worker lives on, and
the scheduler sees an ordinary erred task: nothing is retried as a lost worker, and the
worker's memory is never touched by what ``fn`` does.  Exceptions raised by ``fn`` come
back as themselves.

Fork safety: a dask worker always runs threads (its event loop, its task threads, the
profiler), and holds connections to the scheduler and to its peers.  ForkPool warns about
both (ForkSafetyWarning); ``forked`` turns those checks off on purpose, because the child
never uses them: it runs ``fn`` only and ends with ``_exit``, without closing or writing to
any inherited connection.  What ``fn`` may not do follows from the same facts: it must not
use dask (no client, no dask Lock, Queue or actor: the child has no event loop; ipcfork's
dask objects raise InvalidArgumentError or ObjectClosedError there) and must not rely on
locks that another thread of the worker held at the fork.  ipcfork's local primitives work
in the child as in any fork.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from typing import Any

from .._os.timeouts import check_timeout
from ..errors import InvalidArgumentError
from ..pool import ForkPool
from . import client as _client

__all__ = ["Forked", "forked"]

# One pool per (process, timeout, grace), the most recently used last.  Past MAX_POOLS the
# least recently used one is shut down without waiting: its running tasks still finish,
# but a program that tries many timeouts does not keep a pool and a thread for each.
MAX_POOLS = 8
_POOLS: collections.OrderedDict[tuple[int, float | None, float], ForkPool] = \
    collections.OrderedDict()
_POOLS_LOCK = threading.Lock()


def _threads() -> int:
    """Children at once: the worker's task threads (each waits for its own child)."""
    try:
        worker = _client.require_distributed().get_worker()
    except ValueError:
        return os.cpu_count() or 1
    return max(1, int(worker.state.nthreads))


def _pool(timeout: float | None, grace: float) -> ForkPool:
    key = (os.getpid(), timeout, grace)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            # fork_safety_checks=False: see the module docstring.  handle_signals=False:
            # the worker owns its signals (and this is not the main thread).
            pool = ForkPool(_threads(), timeout=timeout, grace=grace,
                            handle_signals=False, fork_safety_checks=False)
            _POOLS[key] = pool
            while len(_POOLS) > MAX_POOLS:
                _, oldest = _POOLS.popitem(last=False)
                oldest.shutdown(wait=False)
        _POOLS.move_to_end(key)
        return pool


def _in_child(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _client.IN_FORKED_CHILD = True
    return fn(*args, **kwargs)


class Forked:
    """A task that runs ``fn`` in a fork of its dask worker (made by :func:`forked`)."""

    def __init__(self, fn: Callable[..., Any], timeout: float | None, grace: float) -> None:
        self.fn = fn
        self.timeout = timeout
        self.grace = grace
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"forked({self.fn!r}, timeout={self.timeout})"

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("ipcfork.forked", tokenize(self.fn), self.timeout, self.grace)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a child; raise ChildCrashedError or
        TaskTimeoutError as ForkPool does, or what ``fn`` raised."""
        future = _pool(self.timeout, self.grace).submit(_in_child, self.fn, args, kwargs)
        return future.result()


def forked(fn: Callable[..., Any], timeout: float | None = None, *,
           grace: float = 1.0) -> Forked:
    """Wrap ``fn`` so that, submitted as a dask task (``client.submit(forked(fn), x)``),
    it runs in a forked child of the worker: see the module docstring.

    ``timeout``: seconds the child may run (None: no limit); ``grace``: seconds between
    its SIGTERM and SIGKILL.  Raises InvalidArgumentError if ``fn`` is not callable or a
    time is invalid.
    """
    if not callable(fn):
        raise InvalidArgumentError(f"forked() needs a callable, not {fn!r}")
    timeout = check_timeout(timeout)
    if timeout == 0:
        raise InvalidArgumentError("timeout must be > 0 seconds or None", limit="> 0")
    checked_grace = check_timeout(grace, "grace")
    if checked_grace is None:
        raise InvalidArgumentError("grace must be a finite number of seconds")
    return Forked(fn, timeout, checked_grace)
