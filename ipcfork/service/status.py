"""The service's status table: one POSIX shared memory segment, ``/ipcfork.service.<pid>``,
that the supervisor, its workers and ``ipcfork status`` all map.

Layout: a header of 8 signed 64-bit words plus the service's name (64 bytes of UTF-8), then
``CAPACITY`` rows of 8 words, one per worker process (a worker that drains during a reload
keeps its row until it is reaped, so there are twice as many rows as workers allowed).

Each word has one writer.  The supervisor writes a row before it forks the worker and when the
worker drains; the worker writes only its ``heartbeat`` and ``units`` words.  Every word is
8-byte aligned and stored by one machine instruction (a memoryview of ``q``), so a reader sees
the old or the new value, never a torn one; across words a reader may see a row mid-update,
which a status line can live with.  Times are ``CLOCK_MONOTONIC`` nanoseconds, the same clock
in every process of the machine and immune to changes of the wall clock.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from .._os.posix import unlink_posix
from ..errors import ObjectCorruptError, ObjectNotFoundError
from ..shm import SharedMemory

__all__ = ["CAPACITY", "MAX_WORKERS", "Row", "StatusTable", "segment_name"]

MAX_WORKERS = 512
CAPACITY = 2 * MAX_WORKERS  # old and new generation during a reload
_MAGIC = 0x69706366_73766331  # "ipcfsvc1"
_WORDS = 8
_NAME_BYTES = 64
_HEADER = _WORDS * 8 + _NAME_BYTES
_SIZE = _HEADER + CAPACITY * _WORDS * 8
_MAKING_GRACE = 1.0  # seconds open() waits for a table being made to get its magic
# Header words.
MAGIC, SUPERVISOR, GENERATION, WANTED, STARTED, STATE, RESTARTS, _SPARE = range(_WORDS)
# Row words.
ROW_STATE, SLOT, PID, ROW_GENERATION, ROW_STARTED, HEARTBEAT, UNITS, ROW_RESTARTS = \
    range(_WORDS)
FREE, RUNNING, DRAINING = 0, 1, 2
ROW_STATES = {FREE: "free", RUNNING: "running", DRAINING: "draining"}
STARTING, SERVICE_RUNNING, RELOADING, STOPPING = range(4)
SERVICE_STATES = {STARTING: "starting", SERVICE_RUNNING: "running",
                  RELOADING: "reloading", STOPPING: "stopping"}


def segment_name(supervisor_pid: int) -> str:
    """The POSIX name of the status table of the service whose supervisor is that pid."""
    return f"/ipcfork.service.{supervisor_pid}"


def now_ns() -> int:
    """``CLOCK_MONOTONIC`` now, in nanoseconds."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Row:
    """One worker as ``ipcfork status`` shows it."""

    slot: int
    pid: int
    generation: int
    state: str
    uptime: float
    units: int
    heartbeat_age: float
    restarts: int
    rss: int | None

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data."""
        return asdict(self)


def _rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def _open_made(name: str) -> tuple[SharedMemory | None, str]:
    """Open the segment ``name`` as a status table: ``(segment, "")`` when it is a whole
    one, else ``(None, problem)``: "being made" while its magic is still zero (the
    supervisor writes it last), "too small" or "bad magic".  Raises as
    :class:`SharedMemory` does when opening."""
    shm = SharedMemory(name=name, create=False)  # waits for an empty one to be sized
    if shm.size < _SIZE:
        problem = "too small"
    else:
        header = shm.buf[:8].cast("q")
        magic = header[MAGIC]
        header.release()
        if magic == _MAGIC:
            return shm, ""
        problem = "being made" if magic == 0 else "bad magic"
    shm.close()
    return None, problem


class StatusTable:
    """The status segment of one service (see the module docstring).

    :meth:`create` makes a new one (0600, registered so that ``ipcfork clean`` finds it if
    the supervisor is SIGKILLed); :meth:`open` maps a live one for reading.
    """

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self._shm: SharedMemory | None = shm
        self._owner = owner
        self.words = shm.buf.cast("q")

    @classmethod
    def create(cls, name: str) -> StatusTable:
        """A new table for this process's service.  Raises as :class:`SharedMemory`."""
        cls.remove(os.getpid())  # left by a dead process of our pid
        shm = SharedMemory(_SIZE, name=segment_name(os.getpid()), exclusive=True)
        table = cls(shm, owner=True)
        words = table.words
        words[SUPERVISOR], words[STARTED] = os.getpid(), now_ns()
        encoded = name.encode()[:_NAME_BYTES]
        shm.buf[_WORDS * 8:_WORDS * 8 + len(encoded)] = encoded
        words[MAGIC] = _MAGIC  # last: a reader that sees the magic sees a whole header
        return table

    @staticmethod
    def remove(supervisor_pid: int) -> None:
        """Remove the table of the service run by ``supervisor_pid``, if there is one (a
        dead supervisor's: nothing is mapped to do it).  Raises ipcfork errors as the
        unlink fails for another reason than absence."""
        name = segment_name(supervisor_pid)
        with contextlib.suppress(ObjectNotFoundError):
            unlink_posix("shm", name, f"status table {name}")

    @classmethod
    def open(cls, supervisor_pid: int) -> StatusTable:
        """Map the table of the service run by ``supervisor_pid``.

        A table still being made (its magic not yet written) is waited for, up to a
        second; an empty segment, up to the time :class:`SharedMemory` gives its creator.
        Raises ObjectNotFoundError if there is no table, ObjectCorruptError if the segment
        is not a status table, UnsafeObjectError as :class:`SharedMemory` does.
        """
        name = segment_name(supervisor_pid)
        deadline = time.monotonic() + _MAKING_GRACE
        while True:
            shm, problem = _open_made(name)
            if shm is not None:
                return cls(shm, owner=False)
            if problem != "being made" or time.monotonic() >= deadline:
                raise ObjectCorruptError(f"{name} is not a service status table ({problem})")
            time.sleep(0.001)

    @property
    def name(self) -> str:
        """The service's name."""
        raw = bytes(self._shm.buf[_WORDS * 8:_HEADER]) if self._shm is not None else b""
        return raw.rstrip(b"\0").decode(errors="replace")

    def base(self, row: int) -> int:
        """Index in :attr:`words` of the first word of ``row``."""
        return _HEADER // 8 + row * _WORDS

    def header(self, word: int) -> int:
        """One header word (GENERATION, WANTED, ...)."""
        return int(self.words[word])

    def set_header(self, word: int, value: int) -> None:
        """Write one header word (supervisor only)."""
        self.words[word] = value

    def claim(self, slot: int, generation: int, restarts: int) -> int:
        """Fill a free row for a worker about to be forked; returns its index.  The pid is
        written by :meth:`set_pid` once the fork returns.  Raises LookupError when every
        row is taken (workers of several earlier generations still draining)."""
        words = self.words
        for row in range(CAPACITY):
            base = self.base(row)
            if words[base + ROW_STATE] == FREE:
                now = now_ns()
                words[base + SLOT], words[base + PID] = slot, 0
                words[base + ROW_GENERATION], words[base + ROW_STARTED] = generation, now
                words[base + HEARTBEAT], words[base + UNITS] = now, 0
                words[base + ROW_RESTARTS] = restarts
                words[base + ROW_STATE] = RUNNING
                return row
        raise LookupError("the status table is full")

    def free_rows(self) -> int:
        """How many more workers the table has room for."""
        return sum(1 for row in range(CAPACITY)
                   if self.words[self.base(row) + ROW_STATE] == FREE)

    def set_pid(self, row: int, pid: int) -> None:
        """Record the pid of the worker in ``row``."""
        self.words[self.base(row) + PID] = pid

    def set_state(self, row: int, state: int) -> None:
        """Mark ``row`` RUNNING, DRAINING or FREE."""
        self.words[self.base(row) + ROW_STATE] = state

    def word(self, row: int, word: int) -> int:
        """One word of ``row``."""
        return int(self.words[self.base(row) + word])

    def beat(self, row: int) -> None:
        """A worker's heartbeat: the time now, and one more unit done."""
        base = self.base(row)
        words = self.words
        words[base + HEARTBEAT] = now_ns()
        words[base + UNITS] += 1

    def rows(self) -> list[Row]:
        """Every occupied row, ordered by generation and slot."""
        now = now_ns()
        found = []
        for row in range(CAPACITY):
            base = self.base(row)
            state, pid = int(self.words[base + ROW_STATE]), int(self.words[base + PID])
            if state == FREE or pid == 0:
                continue
            found.append(Row(
                slot=int(self.words[base + SLOT]), pid=pid,
                generation=int(self.words[base + ROW_GENERATION]),
                state=ROW_STATES.get(state, "?"),
                uptime=(now - int(self.words[base + ROW_STARTED])) / 1e9,
                units=int(self.words[base + UNITS]),
                heartbeat_age=(now - int(self.words[base + HEARTBEAT])) / 1e9,
                restarts=int(self.words[base + ROW_RESTARTS]), rss=_rss(pid)))
        return sorted(found, key=lambda r: (r.generation, r.slot))

    def summary(self) -> dict[str, Any]:
        """The whole table as JSON-ready data (what ``ipcfork status --json`` prints)."""
        return {
            "name": self.name,
            "pid": self.header(SUPERVISOR),
            "state": SERVICE_STATES.get(self.header(STATE), "?"),
            "generation": self.header(GENERATION),
            "workers_wanted": self.header(WANTED),
            "uptime": (now_ns() - self.header(STARTED)) / 1e9,
            "restarts": self.header(RESTARTS),
            "workers": [row.as_dict() for row in self.rows()],
        }

    def close(self) -> None:
        """Unmap; the owner (the supervisor) also removes the segment.  Harmless twice."""
        if self._shm is None:
            return
        self.words.release()
        shm, self._shm = self._shm, None
        shm.close()
        if self._owner:
            with contextlib.suppress(ObjectNotFoundError):
                shm.unlink()
