"""Opening a service's status table while its supervisor is still making it.

The supervisor creates the segment, sizes it, then writes the header with its magic last.
A reader that comes in between (``ipcfork status``, or a test polling the table) sees zeroes:
that is a table being made and is waited for, briefly; a segment that is not a table is
refused with what is wrong with it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from ipcfork import ObjectCorruptError, SharedMemory
from ipcfork.service import status
from ipcfork.service.status import StatusTable, segment_name

# Above the largest pid_max Linux allows (2**22): no live service can own this name.
NOT_A_PID = 2**22 + 12345
NAME = segment_name(NOT_A_PID)


@contextlib.contextmanager
def segment(size: int) -> Iterator[SharedMemory]:
    """A zero-filled segment under the status table's name, removed afterwards."""
    shm = SharedMemory(size, name=NAME, exclusive=True)
    try:
        yield shm
    finally:
        shm.unlink()
        shm.close()


def _state(pid: int) -> str:
    """The process's scheduler state (R running, S sleeping, Z zombie, ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_table_whose_magic_arrives_later_is_opened() -> None:
    with segment(status._SIZE) as shm:
        pid = os.fork()
        if pid == 0:  # the reader
            code = 1
            try:
                table = StatusTable.open(NOT_A_PID)
                code = 0 if table.name == "late" else 2
                table.close()
            finally:
                os._exit(code)
        try:
            # The reader sleeps only between its looks at the magic: once it sleeps, it has
            # found none and waits for it (a reader that gives up at once never sleeps).
            deadline = time.monotonic() + 10
            while _state(pid) != "S":
                assert time.monotonic() < deadline, "the reader never waited for the magic"
                time.sleep(0.0005)
            shm.buf[64:68] = b"late"
            words = shm.buf.cast("q")
            words[status.MAGIC] = status._MAGIC
            words.release()
        finally:
            _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0


def test_a_table_left_half_made_is_refused_after_a_second() -> None:
    with segment(status._SIZE):
        began = time.monotonic()
        with pytest.raises(ObjectCorruptError, match=r"not a service status table "
                                                     r"\(being made\)"):
            StatusTable.open(NOT_A_PID)
        waited = time.monotonic() - began
        assert status._MAKING_GRACE <= waited < status._MAKING_GRACE + 10


@pytest.mark.parametrize(("size", "magic", "problem"), [
    (status._SIZE, 0x1234, "bad magic"),
    (4096, status._MAGIC, "too small"),
])
def test_a_segment_that_is_no_table_is_refused(size: int, magic: int, problem: str) -> None:
    with segment(size) as shm:
        words = shm.buf.cast("q")
        words[status.MAGIC] = magic
        words.release()
        with pytest.raises(ObjectCorruptError, match=rf"\({problem}\)"):
            StatusTable.open(NOT_A_PID)
