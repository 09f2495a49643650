"""Pieces every primitive shares: argument checks, naming, and anonymous-object cleanup."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from ._os.identity import IDENTITY
from ._os.names import DEFAULT_PROJ, check_backend, sysv_key
from .errors import InvalidArgumentError, ObjectClosedError

__all__ = [
    "ClosingContext", "check_count", "describe", "kernel_limit", "on_creator_exit",
    "raise_closed", "sysv_key_for",
]


def describe(kind: str, name: str | os.PathLike[str] | None, backend: str) -> str:
    """How errors name an object: ``Mutex '/jobs' (posix)`` or ``anonymous Mutex (sysv)``."""
    if name is None:
        return f"anonymous {kind} ({backend})"
    return f"{kind} {os.fspath(name)!r} ({backend})"


def check_count(value: object, what: str, *, low: int, high: int) -> int:
    """Return ``value`` if it is an int in ``low..high``; else raise InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{what} must be an int, not {type(value).__name__}", limit=f"{low}..{high}"
        )
    if not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be in {low}..{high}, not {value}",
                                   limit=f"{low}..{high}")
    return value


def sysv_key_for(
    name: str | os.PathLike[str] | None, proj: int | str, backend: str
) -> int | None:
    """The ftok key of ``name`` for the sysv backend (None when anonymous)."""
    check_backend(backend)
    if name is None or backend != "sysv":
        return None
    return sysv_key(name, DEFAULT_PROJ if proj is None else proj)


def raise_closed(what: str) -> None:
    """Raise ObjectClosedError for ``what``."""
    raise ObjectClosedError(f"{what} is closed in this process", obj=what)


def on_creator_exit(owner: object, action: Callable[..., Any], *args: Any) -> weakref.finalize:  # type: ignore[type-arg]
    """Run ``action(*args)`` when ``owner`` is collected or the creator process exits.

    The action never runs in a forked child: the family's objects belong to the creator.
    """
    creator = IDENTITY.pid

    def _only_in_creator(*call_args: Any) -> None:
        if os.getpid() == creator:
            action(*call_args)

    return weakref.finalize(owner, _only_in_creator, *args)


def kernel_limit(path: str, default: int) -> int:
    """The first number in a /proc file (a kernel limit), or ``default`` if unreadable."""
    try:
        with open(path) as source:
            return int(source.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


class ClosingContext:
    """``with obj as o:`` gives the object itself and closes it (in this process) at the
    end of the block, whatever ends it; subclasses provide :meth:`close`."""

    __slots__ = ()  # keeps subclasses with __slots__ free of a __dict__

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
