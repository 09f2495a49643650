"""Create-or-open: the one way every named IPC object is made or found.

Each kind of object (POSIX semaphore, shm and queue; SysV semaphore set, segment and queue)
is created *exclusively* (``O_CREAT|O_EXCL``, ``IPC_CREAT|IPC_EXCL``), never with a bare
create flag: that would silently open an existing object, and for some kinds reset it
(sysv_ipc's ``Semaphore(key, IPC_CREAT, initial_value=v)`` sets the value of an existing
set).  Only when the exclusive create finds the object already there do we open it, so we
always know whether we made it (and so must initialise it, force its mode and record it)
or found it (and so must check its owner before trusting it).  Those steps differ by kind
and stay with the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import ObjectExistsError
from .translate import translating

__all__ = ["create_or_open"]

T = TypeVar("T")


def create_or_open(
    create: Callable[[], T], open_: Callable[[], T], *, creating: bool, exclusive: bool,
    what: str, backend: str,
) -> tuple[T, bool]:
    """Make the object with ``create`` (an exclusive create) if ``creating``; else, or if it
    already exists and ``exclusive`` is false, open it with ``open_``.

    Returns ``(object, created)``.  Failures of either call are translated to ipcfork
    errors (operation ``create`` or ``open`` on ``what``): ObjectExistsError if the object
    exists and ``exclusive`` is true, ObjectNotFoundError if it is missing and not
    ``creating``, and so on.
    """
    if creating:
        try:
            with translating(what, backend, "create"):
                return create(), True
        except ObjectExistsError:
            if exclusive:
                raise
    with translating(what, backend, "open"):
        return open_(), False
