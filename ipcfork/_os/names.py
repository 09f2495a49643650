"""Names and keys: validation, anonymous name generation, ``ftok``-style SysV keys.

POSIX objects are named ``/name`` (one leading slash, no other).  SysV objects are named by a
filesystem path that is turned into a key with the standard ``ftok(path, proj)``, so programs
in other languages (PHP's ``ftok``, C's ``ftok``) meet the same object.  An anonymous object
gets a private name: ``IPC_PRIVATE`` for SysV, ``/ipcfork.<pid>.<random>`` for POSIX (the
creator pid lets ``ipcfork clean`` find objects whose creator died).
"""

from __future__ import annotations

import os
import secrets
from typing import Final

import sysv_ipc

from ..errors import InvalidArgumentError, ObjectNotFoundError
from .identity import IDENTITY

__all__ = [
    "BACKENDS",
    "POSIX_PREFIX",
    "anonymous_posix_name",
    "check_backend",
    "posix_name",
    "sysv_key",
]

BACKENDS: Final = ("sysv", "posix")
POSIX_PREFIX: Final = "ipcfork."
# Linux NAME_MAX is 255 and glibc stores semaphores as "sem.<name>": keep room for that.
POSIX_NAME_MAX: Final = 251
DEFAULT_PROJ: Final = "i"


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> str:
    """Return ``backend`` if it is one of ``allowed``; raise InvalidArgumentError otherwise."""
    if backend not in allowed:
        raise InvalidArgumentError(
            f"backend must be one of {', '.join(map(repr, allowed))}, not {backend!r}",
            limit=f"backend in {allowed}",
        )
    return backend


def posix_name(name: str) -> str:
    """Normalise a POSIX IPC name to ``/name``.

    Raises InvalidArgumentError for a non-string, an empty name, a slash after the first
    character, a NUL byte, or a name longer than 251 characters.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"a POSIX name must be a str such as '/jobs', not {type(name).__name__}"
        )
    body = name[1:] if name.startswith("/") else name
    if not body or body in (".", ".."):
        raise InvalidArgumentError(f"POSIX name {name!r} is empty", limit="1..251 characters")
    if "/" in body or "\0" in body:
        raise InvalidArgumentError(
            f"POSIX name {name!r} may hold no '/' after the first and no NUL",
            limit="one leading '/' only",
        )
    if len(body) > POSIX_NAME_MAX:
        raise InvalidArgumentError(
            f"POSIX name {name[:40]!r}... is {len(body)} characters long",
            limit=f"at most {POSIX_NAME_MAX} characters",
        )
    return "/" + body


def anonymous_posix_name(kind: str) -> str:
    """A fresh, unguessable POSIX name tagged with the creator's pid."""
    return f"/{POSIX_PREFIX}{IDENTITY.pid}.{kind}.{secrets.token_hex(8)}"


def _proj_id(proj: int | str) -> int:
    if isinstance(proj, str):
        if len(proj) != 1:
            raise InvalidArgumentError(
                f"proj must be one character or an int, not {proj!r}", limit="1..255"
            )
        proj = ord(proj)
    if not isinstance(proj, int) or isinstance(proj, bool) or not 1 <= proj <= 255:
        raise InvalidArgumentError(f"proj must be in 1..255, not {proj!r}", limit="1..255")
    return proj


def sysv_key(path: str | os.PathLike[str], proj: int | str = DEFAULT_PROJ) -> int:
    """The SysV key ``ftok(path, proj)`` computes, as C and PHP compute it.

    Raises ObjectNotFoundError if ``path`` does not exist (ftok needs an existing file) and
    InvalidArgumentError for a bad ``proj``.
    """
    proj_id = _proj_id(proj)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"a SysV name is a filesystem path for ftok(), not {type(path).__name__}"
        )
    fspath = os.fspath(path)
    if not fspath or "\0" in fspath:
        raise InvalidArgumentError(f"SysV name {fspath!r} is not a usable path")
    if not os.path.exists(fspath):
        raise ObjectNotFoundError(
            f"ftok({fspath!r}) needs an existing file; create it first", backend="sysv"
        )
    key: int = sysv_ipc.ftok(fspath, proj_id, silence_warning=True)
    if key == -1:
        raise ObjectNotFoundError(f"ftok({fspath!r}, {proj_id}) failed", backend="sysv")
    return key
