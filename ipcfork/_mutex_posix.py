"""The POSIX backend of :class:`~ipcfork.Mutex` (the default): a robust, process-shared
pthread mutex from the native core, in a POSIX shared-memory object.

The hot methods (``acquire``, ``release``, ``__enter__``, ``__exit__``) are the core type's
own: no Python frame on the fast path.  The kernel's robust-futex list releases the mutex
of a thread that dies holding it, at any instruction, and the next taker is told
(``previous_owner_died``, ``dead_owner_pid``).  See docs/design.md, "The robust mutex".

A named mutex lives in the shm object ``<name>.mutex`` (``/dev/shm/<name>.mutex``); an
anonymous one in ``/ipcfork.<pid>.mutex.<random>``, unlinked at birth.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from . import errors
from ._os.names import anonymous_posix_name, posix_name
from ._os.native import BLOCK_SIZE, INIT_WAIT, RobustMutex, bind_block
from ._os.posix import open_posix_shm, unlink_posix
from .mutex import Mutex

__all__ = ["INIT_WAIT", "MUTEX_SUFFIX", "PosixMutex"]

MUTEX_SUFFIX = ".mutex"


class PosixMutex(RobustMutex, Mutex):  # type: ignore[misc]  # RobustMutex is chosen at import
    """``Mutex(backend="posix")``: see the module docstring and :class:`~ipcfork.Mutex`."""

    __slots__ = ("__weakref__", "_map", "_shm_name", "_what", "anonymous", "backend",
                 "created", "name")

    def __init__(
        self,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        del proj  # a SysV notion, accepted for a uniform signature
        self.backend = "posix"
        self.name = None if name is None else os.fspath(name)
        self.anonymous = name is None
        if name is None:
            self._shm_name = anonymous_posix_name("mutex")
            self._what = "Mutex (posix)"
        else:
            self._shm_name = posix_name(os.fspath(name)) + MUTEX_SUFFIX
            self._what = f"Mutex {os.fspath(name)!r} (posix)"
        self._map: mmap.mmap | None = None
        fd, size, self.created = open_posix_shm(
            self._shm_name, BLOCK_SIZE, create=create or self.anonymous,
            exclusive=exclusive or self.anonymous, allow_foreign=allow_foreign, what=self._what,
            track=not self.anonymous)
        try:
            self._map = self._map_block(fd, size)
            if self.anonymous:
                unlink_posix("shm", self._shm_name, self._what)  # lives while mapped: no leak
            bind_block(self, self._map, 0, self.created, self._what)
        except BaseException:
            if self._map is not None:
                self._map.close()
            if self.created and not self.anonymous:
                with contextlib.suppress(errors.IpcforkError):
                    unlink_posix("shm", self._shm_name, self._what)
            raise
        finally:
            os.close(fd)

    def _map_block(self, fd: int, size: int) -> mmap.mmap:
        """Map the object (``open_posix_shm`` waited for its creator to size it).

        Raises ObjectCorruptError if it is too small to hold a mutex.
        """
        if size < BLOCK_SIZE:
            raise errors.ObjectCorruptError(
                f"{self._what} has {size} bytes, a mutex needs {BLOCK_SIZE}: it is not an "
                "ipcfork mutex", obj=self._what, backend="posix", limit=f">= {BLOCK_SIZE} bytes")
        return mmap.mmap(fd, BLOCK_SIZE)

    def __repr__(self) -> str:
        if self._closed:
            return f"<Mutex {self._what} closed>"
        owner = self.owner
        return f"<Mutex {self._what} {f'locked by {owner}' if owner else 'unlocked'}>"

    def close(self) -> None:
        if self._map is None:
            return
        self._unbind()  # refuses while a thread of this process holds it
        self._map.close()
        self._map = None

    def unlink(self) -> None:
        if not self.anonymous:
            unlink_posix("shm", self._shm_name, self._what)
