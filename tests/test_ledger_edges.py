"""Edges of resumable batches found by reading the code again.

The run lock of a ledger survives the running process reading its own ledger: POSIX record
locks belong to the process and go with *any* close of the file: asking who
holds the lock (``F_GETLK`` on a descriptor opened for the question) from the process that
holds it would drop it, and a second run elsewhere could then start beside the live one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ipcfork

TAKE_LOCK = ("import sys\n"
             "from ipcfork.ledger.runlock import RunLock\n"
             "RunLock(sys.argv[1])\n")


def square(i: int) -> int:
    return i * i


def test_reading_the_ledger_during_a_run_keeps_its_run_lock(tmp_path: Path) -> None:
    ledger = str(tmp_path / "batch.sqlite")
    with ipcfork.ForkPool(2) as pool:
        run = pool.imap_unordered(square, range(50), ledger=ledger)
        next(run)
        book = ipcfork.Ledger(ledger)
        assert book.summary().live_pid == os.getpid()
        assert book.uncertain() == []  # started tasks of a live run are running
        other = subprocess.run([sys.executable, "-c", TAKE_LOCK, ledger], capture_output=True,
                               text=True, timeout=60)
        assert other.returncode == 1
        assert f"LedgerBusyError: ledger {ledger} is in use: pid {os.getpid()}" in other.stderr
        run.close()


def test_a_zero_chunksize_is_refused_with_a_ledger_as_without(tmp_path: Path) -> None:
    ledger = str(tmp_path / "batch.sqlite")
    with ipcfork.ForkPool(1) as pool:
        for extra in ({}, {"ledger": ledger}):
            with pytest.raises(ipcfork.InvalidArgumentError,
                               match="chunksize must be an int >= 1, not 0"):
                pool.imap_unordered(square, range(3), chunksize=0, **extra)
