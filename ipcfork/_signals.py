"""SIGINT and SIGTERM while a ForkPool runs: stop forking, kill and reap every child, free
what the children were writing, restore the previous handlers, then re-raise the signal the
way the previous handler would have taken it (KeyboardInterrupt for the default SIGINT
handler; death by SIGTERM, exit status 143, for the default SIGTERM disposition).

A second signal while the first is being handled kills the children at once (SIGKILL
instead of SIGTERM and a grace period).

Python runs signal handlers in the main thread only, so a pool created elsewhere handles no
signals (``handle_signals=False``); its children still die with their parent
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import ForkPool

__all__ = ["PoolSignals"]

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class PoolSignals:
    """Installs the pool's handlers now and puts the previous ones back on :meth:`restore`."""

    def __init__(self, pool: ForkPool) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self._pool = pool
        self._aborting = False
        self._previous: dict[int, Any] = {}
        for signum in _HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back (only where ours is still installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._aborting:
            self._pool.abort(signum, kill_now=True)  # second signal: no more grace
            return
        self._aborting = True
        previous = self._previous.get(signum, signal.SIG_DFL)
        try:
            self._pool.abort(signum)
        finally:
            self.restore()
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
