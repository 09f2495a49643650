"""Ownership and mode checks applied whenever ipcfork opens an object it did not create.

Neither sysv_ipc nor posix_ipc checks who owns what it opens, so another user can plant a
world-writable object under a name we are about to use ("squatting") and read or corrupt
everything that passes through it.  We refuse such objects unless the caller opts in with
``allow_foreign=True``.  Objects we create are forced to mode 0600, whatever the umask.
"""

from __future__ import annotations

import os
import stat

from ..errors import ObjectCorruptError, ObjectNotFoundError, UnsafeObjectError

__all__ = ["CREATE_MODE", "SEM_T_SIZE", "check_owner", "check_posix_file", "posix_sem_path"]

CREATE_MODE = 0o600
_GROUP_OTHER_WRITE = 0o022
# sizeof(sem_t) with glibc on 64-bit Linux; a shorter file would SIGBUS on first touch.
SEM_T_SIZE = 32


def check_owner(
    uid: int, mode: int, what: str, backend: str, *, allow_foreign: bool, creator_uid: int = -1
) -> None:
    """Refuse an object owned by another uid or writable by group/others.

    Raises UnsafeObjectError naming the owner and mode unless ``allow_foreign`` is true.
    """
    if allow_foreign:
        return
    me = os.geteuid()
    owners = {uid} if creator_uid < 0 else {uid, creator_uid}
    if owners != {me}:
        raise UnsafeObjectError(
            f"{what} is owned by uid {sorted(owners)}, not by this user (uid {me}); "
            "pass allow_foreign=True to open it anyway",
            obj=what,
            backend=backend,
            limit="owner == current uid",
        )
    if mode & _GROUP_OTHER_WRITE:
        raise UnsafeObjectError(
            f"{what} has mode {mode & 0o777:04o}, writable by group or others; "
            "pass allow_foreign=True to open it anyway",
            obj=what,
            backend=backend,
            limit="mode without group/other write bits",
        )


def posix_sem_path(name: str) -> str:
    """Where glibc keeps the POSIX semaphore ``name``."""
    return "/dev/shm/sem." + name.lstrip("/")


def check_posix_file(path: str, what: str, *, allow_foreign: bool, min_size: int = 0) -> None:
    """Check the file behind a POSIX object before opening it.

    Raises ObjectNotFoundError if it is missing, ObjectCorruptError if it is not a regular
    file or is shorter than ``min_size`` (a truncated semaphore would crash the interpreter
    with SIGBUS), and UnsafeObjectError as :func:`check_owner` does.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ObjectNotFoundError(f"{what} does not exist", obj=what, backend="posix") from None
    if not stat.S_ISREG(st.st_mode):
        raise ObjectCorruptError(
            f"{what} is not a regular file ({path})", obj=what, backend="posix"
        )
    check_owner(st.st_uid, st.st_mode, what, "posix", allow_foreign=allow_foreign)
    if st.st_size < min_size:
        raise ObjectCorruptError(
            f"{what} is {st.st_size} bytes long, too short to be valid; refusing to map it",
            obj=what,
            backend="posix",
            limit=f"size >= {min_size}",
        )

