"""Shared memory segments (POSIX or SysV) exposed as a zero-copy, bounds-checked buffer.

``SharedMemory(size)`` is anonymous: a child forked afterwards shares it (POSIX: unlinked at
birth; SysV: marked for removal at birth, so the kernel frees it at the family's last
detach).  ``buf`` is a ``memoryview`` straight onto the pages, so ``numpy.frombuffer(shm.buf)``
or ``bytes(shm.buf[a:b])`` need no copy; every access is bounds-checked by the memoryview.

``close()`` refuses while a view derived from ``buf`` is alive (sysv_ipc would detach and
leave the view dangling; touching it then crashes the interpreter).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from typing import Any

import posix_ipc
import sysv_ipc

from ._common import (
    ClosingContext,
    check_count,
    describe,
    kernel_limit,
    raise_closed,
    sysv_key_for,
)
from ._os.posix import open_posix_shm, resolve_posix_name, unlink_posix
from ._os.sysv import open_sysv_shm, remove_sysv
from ._os.translate import translating
from .errors import BufferInUseError, InvalidArgumentError

__all__ = ["SharedMemory"]

MAX_SIZE = sys.maxsize  # the real limit (free /dev/shm, SHMMAX) is checked at creation



class SharedMemory(ClosingContext):
    """A shared memory segment of ``size`` bytes, zero-filled when new.

    ``name`` works as for :class:`Semaphore`; ``size`` is needed to create and ignored when
    opening an existing segment (whose size is then reported by :attr:`size`).

    Raises InvalidArgumentError for a size < 1, LimitExceededError when the size passes free
    space in ``/dev/shm`` (posix) or SHMMAX (sysv), and as :class:`Semaphore` for names.
    """

    def __init__(
        self,
        size: int | None = None,
        name: str | os.PathLike[str] | None = None,
        *,
        backend: str = "posix",
        create: bool = True,
        exclusive: bool = False,
        allow_foreign: bool = False,
        proj: int | str = "i",
    ) -> None:
        key = sysv_key_for(name, proj, backend)
        if size is not None or name is None:
            if size is None:
                raise InvalidArgumentError("an anonymous SharedMemory needs a size")
            check_count(size, "SharedMemory size", low=1, high=MAX_SIZE)
        self.backend = backend
        self.name = None if name is None else os.fspath(name)
        self._what = describe("SharedMemory", name, backend)
        self._raw: Any = None
        self._map: mmap.mmap | None = None
        creating = create or exclusive or name is None
        if backend == "posix":
            if name is not None and not isinstance(name, str):
                raise InvalidArgumentError(f"a POSIX name must be a str, not {name!r}")
            self._posix_name, anonymous = resolve_posix_name(name, "shm")
            fd, self.size, self.created = open_posix_shm(
                self._posix_name, size if creating else None, create=creating,
                exclusive=exclusive or anonymous, allow_foreign=allow_foreign, what=self._what,
                track=not anonymous)
            try:
                if anonymous:
                    posix_ipc.unlink_shared_memory(self._posix_name)
                if self.size == 0:
                    raise InvalidArgumentError(f"{self._what} is empty (0 bytes)",
                                               obj=self._what, backend="posix")
                with translating(self._what, "posix", "map"):
                    self._map = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
            self._buf = memoryview(self._map)
        else:
            if creating and size is not None:
                shmmax = kernel_limit("/proc/sys/kernel/shmmax", MAX_SIZE)
                if size > shmmax:
                    from .errors import LimitExceededError

                    raise LimitExceededError(
                        f"{self._what}: {size} bytes requested", obj=self._what,
                        backend="sysv", limit=f"size <= {shmmax} (SHMMAX)")
            self._raw, self.created = open_sysv_shm(
                key, size, create=creating, exclusive=exclusive, allow_foreign=allow_foreign,
                what=self._what)
            self.size = int(self._raw.size)
            self._buf = memoryview(self._raw)
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<SharedMemory {self._what} {state}>"

    @property
    def buf(self) -> memoryview:
        """A writable memoryview of the whole segment.  Raises ObjectClosedError if closed."""
        if self._closed:
            raise_closed(self._what)
        return self._buf

    def close(self) -> None:
        """Unmap the segment from this process.

        Raises BufferInUseError while a memoryview, slice or numpy array made from
        :attr:`buf` is alive (release or delete them first).  Closing twice is harmless.
        """
        if self._closed:
            return
        try:
            self._buf.release()
        except BufferError as exc:
            raise self._in_use() from exc
        if self._map is not None:
            try:
                self._map.close()
            except BufferError as exc:
                self._buf = memoryview(self._map)
                raise self._in_use() from exc
        else:
            # Views sliced from buf keep a reference to the sysv_ipc object alive: our own
            # attribute and getrefcount's argument are the only two allowed.
            if sys.getrefcount(self._raw) > 2:
                self._buf = memoryview(self._raw)
                raise self._in_use()
            with contextlib.suppress(sysv_ipc.Error):
                self._raw.detach()
        self._closed = True

    def _in_use(self) -> BufferInUseError:
        return BufferInUseError(
            f"{self._what} still has views (memoryview slices or numpy arrays) into it; "
            "release them before close()", obj=self._what, backend=self.backend)

    def unlink(self) -> None:
        """Remove a named segment system-wide (the pages live until the last unmap).

        Raises ObjectNotFoundError if it is already gone; anonymous segments need no unlink.
        """
        if self.name is None:
            return
        if self.backend == "posix":
            unlink_posix("shm", self._posix_name, self._what)
        else:
            if self._raw is not None:
                remove_sysv(self._raw, "shm", self._what)
