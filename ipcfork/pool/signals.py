"""SIGINT and SIGTERM while ForkPools run: stop forking, kill and reap every child, restore
the previous handlers, then re-raise the signal the way the previous handler would have
taken it (KeyboardInterrupt for Python's default SIGINT handler; death by SIGTERM, exit
status 143, for the default SIGTERM disposition).

One process-wide handler serves every live pool, installed with the first pool and removed
with the last, so pools shut down in any order leave exactly the original handlers.  A second
signal while the first is being handled kills the children at once (SIGKILL, no grace).

Python runs signal handlers in the main thread only: a pool created elsewhere handles no
signals; its children still die with their parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import threading
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import ForkPool

__all__ = ["register", "unregister"]

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_pools: weakref.WeakSet[ForkPool] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_handling = False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def register(pool: ForkPool) -> None:
    """Let ``pool`` be stopped by SIGINT/SIGTERM.  Raises RuntimeError off the main thread."""
    if not _main_thread():
        raise RuntimeError("signal handlers can only be installed from the main thread")
    if not _previous:
        for signum in _HANDLED:
            _previous[signum] = signal.signal(signum, _handle)
    _pools.add(pool)


def unregister(pool: ForkPool) -> None:
    """Forget ``pool``; with the last pool gone, put the original handlers back (from the
    main thread; elsewhere that waits for the next register/unregister there)."""
    _pools.discard(pool)
    if not _pools and _previous and _main_thread():
        _restore()


def _restore() -> None:
    for signum, handler in list(_previous.items()):
        if signal.getsignal(signum) is _handle:
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    _previous.clear()


def _handle(signum: int, frame: FrameType | None) -> None:
    global _handling
    pools = list(_pools)
    if _handling:
        for pool in pools:
            pool.abort(signum, kill_now=True)  # second signal: no more grace
        return
    _handling = True
    previous = _previous.get(signum, signal.SIG_DFL)
    try:
        for pool in pools:
            pool.abort(signum)
    finally:
        _pools.clear()
        _restore()
        _handling = False
    _deliver(signum, previous, frame)


def _deliver(signum: int, previous: Any, frame: FrameType | None) -> None:
    """Hand the signal to what was there before us."""
    if previous is signal.SIG_IGN:
        return
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if callable(previous):
        previous(signum, frame)
        return
    # SIG_DFL (or None: a handler not installed from Python): die as the signal demands.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
