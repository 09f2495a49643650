"""Who holds a POSIX record lock (``fcntl`` ``F_GETLK``), asked without taking it.

The service's pidfile and a ledger's run lock are both POSIX record locks: the kernel
drops them when their process dies however it dies, forked children do not inherit them,
and ``F_GETLK`` names the holder's pid, which is how a refused second service or batch,
and ``ipcfork status``, say who is running.
"""

from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["holder_of", "holder_of_path"]

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to the alignment of off_t ("0q").
_FLOCK = "hhqqi0q"


def holder_of(fd: int) -> int | None:
    """The pid of the process holding a write-conflicting lock on the file of ``fd``, or
    None.  Raises OSError if ``fcntl`` fails."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if kind == fcntl.F_UNLCK else int(pid)


def holder_of_path(path: str) -> int | None:
    """:func:`holder_of` for the file at ``path``; None if it cannot be opened (missing).

    Never call it in the process that holds the lock: closing the descriptor it opens
    would drop that process's lock on the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return holder_of(fd)
    finally:
        os.close(fd)
