"""The layout of a SharedCounter's segment, its int64 arithmetic, and the per-thread lanes
that point into it (see counter.py)."""

from __future__ import annotations

import struct

from .errors import InvalidArgumentError

__all__ = ["SIZE", "STRIPES"]

STRIPES = 64
_LINE = 128
_LOCK = _LINE  # the mutex block: line 1
_STRIPE_AT = [_LINE * (2 + i) for i in range(STRIPES)]  # stripes from line 2
SIZE = _LINE * (2 + STRIPES)
_PENDING, _MODE, _FROZEN_SUM, _MAGIC = 0, 8, 16, 24
_WORD, _OWNER, _PIN, _RECORD = 0, 8, 16, 24
_MAGIC_VALUE = 0x34746E6366637069  # b"ipcfcnt4", little-endian
_STRIPED, _CENTRAL = 0, 1

_FROZEN = 1
_BLOCKED = 1 << 62
_COUNT_MASK = (1 << 32) - 1
_U64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SMALL = 1 << 31  # adds of |n| below this go to a stripe; larger ones straight to pending
_RETIRE = 1 << 61  # a stripe word past this is left for good: its count can never overflow
# (word + _RETIRE) & _SLOW_BITS is 0 exactly when the word is even (not FROZEN) and within
# [-_RETIRE, _RETIRE): one test instead of three.
_SLOW_BITS = -(1 << 62) | _FROZEN
_THAW_AFTER = 4096  # central adds by one thread before it tries to go back to stripes
_UNFREEZE_TRIES = 100  # attempts to find a frozen stripe without a move in flight


def _words_at(offsets: list[int]) -> struct.Struct:
    """A struct reading the int64 words at these ascending byte offsets."""
    layout, at = "<", 0
    for offset in offsets:
        layout += f"{offset - at}xq"
        at = offset + 8
    return struct.Struct(layout)


_WORDS = _words_at([_PENDING] + [line + _WORD for line in _STRIPE_AT])
_RECORDS = _words_at([line + _RECORD for line in _STRIPE_AT])
_OWNERS = _words_at([line + _OWNER for line in _STRIPE_AT])


def _wrap(value: int) -> int:
    """``value`` reduced to a signed 64-bit integer, as the hardware adds."""
    return ((value - _INT64_MIN) & _U64) + _INT64_MIN


def _int64(value: object, what: str) -> int:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidArgumentError(
            f"{what} must be an int in -2**63..2**63-1, not {value!r}",
            limit="-2**63 <= n < 2**63")
    return value


class _Lane:
    """One thread's offsets into its process's stripe (``word`` is None without one)."""

    __slots__ = ("central_adds", "pin", "pinned", "word")

    def __init__(self, index: int | None) -> None:
        self.word = None if index is None else _STRIPE_AT[index] + _WORD
        self.pin = None if index is None else _STRIPE_AT[index] + _PIN
        self.pinned = False  # holds one count on its pin: linearizable ops need no RMW
        self.central_adds = 0


class _LaneGuard:
    """Lives in one thread's locals, so it dies when the thread ends (see ``_lane``)."""
