"""When a worker that died is replaced, and when the service gives up.

- **Backoff per slot:** the first replacement waits ``FIRST_DELAY`` (0.1 s), each further one
  twice as long, up to ``MAX_DELAY`` (30 s).  A worker that ran ``STEADY_SECONDS`` or longer
  before dying puts its slot back to the first delay: it was not part of a crash loop.
- **Crash loop:** more than ``max_restarts`` unrequested exits, in any slots, within
  ``restart_window`` seconds stop the service (:class:`~ipcfork.CrashLoopError`) instead of
  forking doomed workers for ever.  So do more than ``max_restarts`` quick deaths in a row
  of one slot (each within ``STEADY_SECONDS`` of its start): with one worker, the backoff
  soon spaces exits further apart than any window, and a broken unit must still stop.
"""

from __future__ import annotations

from collections import deque

__all__ = ["FIRST_DELAY", "MAX_DELAY", "STEADY_SECONDS", "RestartPolicy"]

FIRST_DELAY = 0.1
MAX_DELAY = 30.0
STEADY_SECONDS = 10.0


class RestartPolicy:
    """Backoff and crash-loop bookkeeping for one service (see the module docstring)."""

    def __init__(self, max_restarts: int, restart_window: float) -> None:
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._recent: deque[float] = deque()
        self._delays: dict[int, float] = {}
        self._streaks: dict[int, int] = {}  # slot -> quick deaths in a row
        self.by_slot: dict[int, int] = {}  # slot -> unrequested exits, all told
        self.reason = ""  # which rule made the last crash loop

    def record_exit(self, slot: int, lived: float, now: float) -> float | None:
        """A worker of ``slot`` that ran ``lived`` seconds ended without being asked to.
        Returns the delay before its replacement, or None when this exit makes a crash loop
        (the caller stops the service)."""
        self.by_slot[slot] = self.by_slot.get(slot, 0) + 1
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.restart_window:
            self._recent.popleft()
        streak = 1 if lived >= STEADY_SECONDS else self._streaks.get(slot, 0) + 1
        self._streaks[slot] = streak
        if len(self._recent) > self.max_restarts:
            self.reason = (f"{len(self._recent)} worker exits within "
                           f"{self.restart_window:g} s (max_restarts={self.max_restarts})")
            return None
        if streak > self.max_restarts:
            self.reason = (f"worker {slot} died {streak} times in a row, each within "
                           f"{STEADY_SECONDS:g} s of its start (max_restarts="
                           f"{self.max_restarts})")
            return None
        previous = self._delays.get(slot)
        if previous is None or lived >= STEADY_SECONDS:
            delay = FIRST_DELAY
        else:
            delay = min(previous * 2, MAX_DELAY)
        self._delays[slot] = delay
        return delay

    @property
    def total(self) -> int:
        """Unrequested exits of every slot, all told."""
        return sum(self.by_slot.values())
