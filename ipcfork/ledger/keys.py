"""Task keys, item fingerprints and the function's name: what identifies a batch's tasks
across runs.

A key is a ``str`` or an ``int`` (a 64-bit one: SQLite's integer): by default the item's
index in the input, or what ``key(item)`` returns.  A fingerprint is a 128-bit BLAKE2b
digest of a *canonical* encoding of the item, so that the same item gives the same
fingerprint in another process, after a restart, under another ``PYTHONHASHSEED``:

- ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``bytearray``, and tuples,
  lists, dicts, sets and frozensets of them are encoded field by field; dicts and sets by
  their *sorted* encoded members, because iteration order of a set of strings changes
  with the hash seed from one run to the next (and pickling it keeps that order);
- any other object by its pickle (protocol 4): stable for dataclasses, namedtuples and
  plain objects whose state is itself stable.  An object whose pickle varies from run to
  run (a set of strings inside an instance's ``__dict__``) needs ``fingerprint=``: a
  callable ``item -> str | bytes`` whose result is hashed instead.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import struct
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["TaskKey", "check_callable", "fingerprint_of", "function_name", "key_of"]

TaskKey = str | int

_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_PICKLE_PROTOCOL = 4  # fixed: a future default protocol must not change fingerprints


def check_callable(value: object, what: str) -> None:
    """Raise InvalidArgumentError unless ``value`` is None or callable."""
    if value is not None and not callable(value):
        raise InvalidArgumentError(f"{what} must be a callable (item -> value), not "
                                   f"{type(value).__name__} {value!r:.60}")


def key_of(key: Callable[[Any], Any] | None, item: Any, position: int) -> TaskKey:
    """The key of the item at ``position``: the position itself, or ``key(item)``.

    Raises InvalidArgumentError if ``key`` returns anything but a str or an int that fits
    in 64 bits (naming the item's position and the type returned).
    """
    if key is None:
        return position
    value = key(item)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgumentError(
            f"key(item) must return a str or an int, not {type(value).__name__} "
            f"{value!r:.60} (item {position}: {item!r:.60})")
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidArgumentError(f"key {value} of item {position} does not fit in 64 bits",
                                   limit="-2**63 <= key < 2**63")
    return value


def fingerprint_of(item: Any, custom: Callable[[Any], Any] | None = None) -> bytes:
    """The item's fingerprint (16 bytes, see the module docstring).

    Raises InvalidArgumentError if the item cannot be encoded (an object that does not
    pickle) or ``custom`` returns something other than str or bytes.
    """
    digest = hashlib.blake2b(digest_size=16)
    if custom is not None:
        value = custom(item)
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidArgumentError(f"fingerprint(item) must return str or bytes, not "
                                       f"{type(value).__name__}")
        digest.update(value)
        return digest.digest()
    parts: list[bytes] = []
    try:
        _encode(item, parts)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"item {item!r:.60} cannot be fingerprinted ({exc}); pass fingerprint= (a "
            "callable item -> str | bytes) to name what identifies it") from exc
    for part in parts:
        digest.update(part)
    return digest.digest()


def _sized(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<Q", len(data)) + data


def _encode(value: Any, out: list[bytes]) -> None:
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        out.append(_sized(b"i", str(value).encode()))
    elif kind is float:
        out.append(b"f" + struct.pack("<d", value))
    elif kind is str:
        out.append(_sized(b"s", value.encode("utf-8", "surrogatepass")))
    elif kind is bytes or kind is bytearray:
        out.append(_sized(b"b", bytes(value)))
    elif kind is tuple or kind is list:
        out.append((b"t" if kind is tuple else b"l") + struct.pack("<Q", len(value)))
        for member in value:
            _encode(member, out)
    elif kind is dict:
        pairs = sorted(_joined(k) + _joined(v) for k, v in value.items())
        out.append(b"d" + struct.pack("<Q", len(pairs)))
        out.extend(_sized(b"", pair) for pair in pairs)
    elif kind is set or kind is frozenset:
        members = sorted(_joined(member) for member in value)
        out.append(b"e" + struct.pack("<Q", len(members)))
        out.extend(_sized(b"", member) for member in members)
    else:
        out.append(_sized(b"p", pickle.dumps(value, protocol=_PICKLE_PROTOCOL)))


def _joined(value: Any) -> bytes:
    parts: list[bytes] = []
    _encode(value, parts)
    return b"".join(parts)


def function_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of the function a batch runs (of the wrapped function for a
    ``functools.partial``; of the class for another callable object)."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not hasattr(target, "__qualname__"):
        target = type(target)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{target.__qualname__}"
