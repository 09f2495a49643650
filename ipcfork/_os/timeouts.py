"""Timeout validation and deadlines measured on the monotonic clock."""

from __future__ import annotations

import math
import time

from ..errors import InvalidArgumentError

__all__ = ["Deadline", "check_timeout"]


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """Validate a timeout in seconds; ``None`` (or +inf) means wait forever.

    Raises InvalidArgumentError for a negative, NaN or non-numeric timeout.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if math.isnan(timeout) or timeout < 0:
        raise InvalidArgumentError(f"{what} must be >= 0 seconds, not {timeout!r}", limit=">= 0")
    if math.isinf(timeout):
        return None
    return float(timeout)


class Deadline:
    """The time left until ``timeout`` seconds from now (``None``: never)."""

    __slots__ = ("_end",)

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left, never negative; None if there is no deadline."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
