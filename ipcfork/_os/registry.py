"""What ipcfork processes created, so ``ipcfork ls`` / ``ipcfork clean`` can find leftovers.

Each SysV object and each named POSIX object that ipcfork creates gets a small JSON record
in a private runtime directory (``$IPCFORK_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/ipcfork``,
else ``/tmp/ipcfork-<uid>``), naming its creator by token (pid + start time).  The record
goes when the object is removed through ipcfork.  Anonymous POSIX objects need no record:
they are unlinked at birth.  POSIX names made by ipcfork carry the creator's pid
(``/ipcfork.<pid>.<kind>.<random>``) so a scan of ``/dev/shm`` finds them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Any

import posix_ipc
import sysv_ipc

from ..errors import UnsafeObjectError
from .identity import IDENTITY, process_alive, token_alive, token_pid
from .names import POSIX_PREFIX
from .procfs import sysv_row
from .usage import PosixUsers, sysv_usage

__all__ = ["Record", "clean", "forget", "list_objects", "remember", "runtime_dir"]



def runtime_dir() -> str:
    """The registry directory, created 0700 on first use.

    Raises UnsafeObjectError if it exists but belongs to another user or is open to others.
    """
    base = os.environ.get("IPCFORK_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "ipcfork") if xdg else f"/tmp/ipcfork-{os.geteuid()}"
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UnsafeObjectError(
            f"registry directory {base} is not private to uid {os.geteuid()}",
            limit="owner == current uid, mode 0700",
        )
    return base


def _record_path(backend: str, kind: str, ident: str) -> str:
    safe = ident.replace("/", "_")
    return os.path.join(runtime_dir(), f"{backend}-{kind}-{safe}.json")


def remember(backend: str, kind: str, ident: str, **facts: Any) -> None:
    """Record that this process created an object (best effort: never fails the caller)."""
    data = {"backend": backend, "kind": kind, "ident": ident, "token": IDENTITY.token}
    data.update(facts, created=time.time())
    if backend == "sysv":
        row = _sysv_row(kind, ident)
        if row is not None:
            data["ctime"] = row[1]
    with contextlib.suppress(OSError):
        path = _record_path(backend, kind, ident)
        tmp = f"{path}.{IDENTITY.pid}.tmp"
        with open(tmp, "w") as out:
            json.dump(data, out)
        os.replace(tmp, path)


def forget(backend: str, kind: str, ident: str) -> None:
    """Drop the record of a removed object (missing records are fine)."""
    with contextlib.suppress(OSError):
        os.unlink(_record_path(backend, kind, ident))


@dataclass(frozen=True)
class Record:
    """One ipcfork object found on this machine, and who uses it (see ``_usage``)."""

    backend: str
    kind: str
    ident: str
    creator_pid: int | None
    creator_alive: bool
    exists: bool
    source: str  # "registry" or "scan"
    users: tuple[int, ...] = ()  # live processes seen using it (not this one)
    attached: int = 0  # SysV: processes attached (shm); waiting or counted users (semaphore)

    @property
    def in_use(self) -> bool:
        """True if some live process is seen using the object."""
        return self.exists and bool(self.users or self.attached)

    @property
    def state(self) -> str:
        """``gone`` (the object no longer exists), ``live`` (its creator runs), ``in use``
        (its creator is dead but others use it) or ``orphan`` (nobody is seen using it)."""
        if not self.exists:
            return "gone"
        if self.creator_alive:
            return "live"
        return "in use" if self.in_use else "orphan"


def _sysv_row(kind: str, ident: str) -> tuple[int, int] | None:
    """``(key, ctime)`` of SysV object ``ident`` from /proc, or None if it is gone."""
    try:
        row = sysv_row(kind, ident)
        return None if row is None else (int(row["key"]), int(row["ctime"]))
    except (KeyError, ValueError):  # a record of an unknown kind, or an unexpected table
        return None


def _sysv_exists(kind: str, ident: str, key: int | None, ctime: int | None) -> bool:
    """True if SysV object ``ident`` exists and still has the key and creation-change time
    recorded (an id the kernel reused for an unrelated object is not ours)."""
    row = _sysv_row(kind, ident)
    if row is None:
        return False
    return (key is None or row[0] == key) and (ctime is None or row[1] == ctime)


def _posix_exists(kind: str, ident: str) -> bool:
    if kind == "semaphore":
        return os.path.exists("/dev/shm/sem." + ident.lstrip("/"))
    if kind == "shm":
        return os.path.exists("/dev/shm/" + ident.lstrip("/"))
    try:
        mq = posix_ipc.MessageQueue(ident, 0)
    except posix_ipc.Error:
        return False
    mq.close()
    return True


_SCAN = re.compile(r"^(sem\.)?" + re.escape(POSIX_PREFIX) + r"(\d+)\.")


def _with_usage(record: Record, posix_users: PosixUsers) -> Record:
    if not record.exists:
        return record
    if record.backend == "sysv":
        users, attached = sysv_usage(record.kind, record.ident)
    else:
        users, attached = posix_users.users(record.kind, record.ident), 0
    return replace(record, users=users, attached=attached)


def _scan_dev_shm() -> list[Record]:
    found = []
    for directory, kind in (("/dev/shm", None), ("/dev/mqueue", "queue")):
        with contextlib.suppress(OSError):
            for entry in os.listdir(directory):
                match = _SCAN.match(entry)
                if not match:
                    continue
                pid = int(match.group(2))
                obj_kind = kind or ("semaphore" if match.group(1) else "shm")
                name = "/" + entry.removeprefix("sem.")
                found.append(
                    Record("posix", obj_kind, name, pid, process_alive(pid), True, "scan")
                )
    return found


def list_objects() -> list[Record]:
    """Every ipcfork object this user's registry knows of, plus tagged POSIX names, with
    the live processes seen using each."""
    records: list[Record] = []
    seen: set[tuple[str, str, str]] = set()
    with contextlib.suppress(OSError):
        base = runtime_dir()
        for entry in sorted(os.listdir(base)):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(base, entry)) as source:
                    data = json.load(source)
                backend, kind, ident = data["backend"], data["kind"], str(data["ident"])
                token = int(data["token"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if backend == "sysv":
                key, ctime = data.get("key"), data.get("ctime")
                exists = _sysv_exists(kind, ident, None if key is None else int(key),
                                      None if ctime is None else int(ctime))
            else:
                exists = _posix_exists(kind, ident)
            records.append(
                Record(backend, kind, ident, token_pid(token), token_alive(token), exists,
                       "registry")
            )
            seen.add((backend, kind, ident))
    records += [r for r in _scan_dev_shm() if (r.backend, r.kind, r.ident) not in seen]
    posix_users = PosixUsers()
    return [_with_usage(record, posix_users) for record in records]


# How each kind of object is removed, and the error that means it is gone already.
_REMOVERS: dict[tuple[str, str], tuple[Any, type[Exception]]] = {
    ("sysv", "semaphore"): (lambda ident: sysv_ipc.remove_semaphore(int(ident)),
                            sysv_ipc.Error),
    ("sysv", "shm"): (lambda ident: sysv_ipc.remove_shared_memory(int(ident)), sysv_ipc.Error),
    ("sysv", "queue"): (lambda ident: sysv_ipc.remove_message_queue(int(ident)),
                        sysv_ipc.Error),
    ("posix", "semaphore"): (posix_ipc.unlink_semaphore, posix_ipc.Error),
    ("posix", "shm"): (posix_ipc.unlink_shared_memory, posix_ipc.Error),
    ("posix", "queue"): (posix_ipc.unlink_message_queue, posix_ipc.Error),
}


def _remove(record: Record) -> None:
    remover, gone = _REMOVERS[(record.backend, record.kind)]
    with contextlib.suppress(gone):
        remover(record.ident)


def clean(*, include_live: bool = False,
          force: bool = False) -> tuple[list[Record], list[Record]]:
    """Remove ipcfork objects whose creator is dead (``include_live``: of live creators too).

    An object some live process is seen using (SysV segment attached; SysV semaphore or
    queue last used or waited on by a live process; POSIX object open or mapped: see
    ``_usage``) is kept unless ``force``.  Returns ``(acted, kept)``: the records acted on
    (removed, or forgotten when the object was already gone: their records are dropped)
    and those kept because in use.
    """
    acted, kept = [], []
    for record in list_objects():
        if record.creator_alive and not include_live:
            continue
        if record.in_use and not force:
            kept.append(record)
            continue
        if record.exists:
            _remove(record)
        if record.source == "registry":
            forget(record.backend, record.kind, record.ident)
        acted.append(record)
    return acted, kept
