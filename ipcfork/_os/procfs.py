"""Reading /proc: the SysV IPC tables (``/proc/sysvipc``) and a process's ``stat`` line.

The registry, ``usage`` and :mod:`ipcfork.testing` all read the same tables, and
``identity`` and ``testing`` the same ``stat`` line; their layouts are parsed here once.
"""

from __future__ import annotations

import contextlib

__all__ = ["SYSV_TABLES", "stat_fields", "sysv_ids", "sysv_row"]

SYSV_TABLES = {"semaphore": "/proc/sysvipc/sem", "shm": "/proc/sysvipc/shm",
               "queue": "/proc/sysvipc/msg"}


def sysv_ids(kind: str) -> list[int]:
    """The ids of every SysV object of ``kind`` (``semaphore``, ``shm``, ``queue``) on the
    machine now.

    Raises OSError if the table cannot be read, KeyError for an unknown kind.
    """
    with open(SYSV_TABLES[kind]) as table:
        next(table, None)  # the column names
        return [int(line.split()[1]) for line in table]


def sysv_row(kind: str, ident: str) -> dict[str, str] | None:
    """The /proc/sysvipc row of SysV object ``ident`` by column name (``key``, ``ctime``,
    ``nattch``, ...), or None if it is gone or the table cannot be read."""
    with contextlib.suppress(OSError, StopIteration), open(SYSV_TABLES[kind]) as table:
        names = next(table).split()
        for line in table:
            fields = line.split()
            # Column 1 is the id, whatever the table calls it (semid, shmid, msqid).
            if len(fields) > 1 and fields[1] == ident:
                return dict(zip(names, fields, strict=False))
    return None


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: ``[0]`` is the state
    (field 3), ``[1]`` the parent pid (field 4), ``[19]`` the start time (field 22).

    Raises FileNotFoundError or ProcessLookupError if ``pid`` is gone, OSError if the file
    cannot be read.
    """
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces, parentheses and bytes that are not UTF-8:
    # split after the last ')' and decode only the numeric fields that follow.
    return text[text.rindex(b")") + 2 :].decode("ascii").split()
