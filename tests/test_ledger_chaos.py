"""Chaos for resumable batches: a 2,000-task batch whose parent is SIGKILLed at random
moments five times, then resumed to completion.  Every result is recorded once and
correct, and the tasks run again number at most kills x in-flight tasks."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import ipcfork
from ipcfork import testing

RUNNER = str(Path(__file__).with_name("ledger_runner.py"))
TASKS = 2000
KILLS = 5
WORKERS = 2
# The batch's in-flight window with chunksize=1 (see ForkPool._ledger): at most this many
# tasks are started and not recorded at any time.
IN_FLIGHT = {"persistent": WORKERS * 2 * 8, "fork": WORKERS * 4}


def start(args: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, RUNNER, json.dumps(args)],
                            stdout=subprocess.PIPE, text=True)


def done_count(path: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM tasks WHERE state = 'done'").fetchone()[0])


def kill_mid_batch(args: dict[str, object], progress: int) -> None:
    """Run the batch until at least ``progress`` results not recorded before this run have
    been yielded (so committed: the run has started and made progress), then SIGKILL it
    and wait until its pool's children (killed by their parent-death signal) are gone."""
    before = done_count(str(args["path"])) if os.path.exists(str(args["path"])) else 0
    proc = start(args)
    assert proc.stdout is not None
    try:
        for _ in range(before + progress):  # recorded results may come first: skip them
            line = proc.stdout.readline()
            assert line.startswith("R "), f"the runner ended early: {line!r}"
        helpers = testing.children(proc.pid)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert testing.wait_gone(helpers) == [], "outlived its SIGKILLed parent"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["persistent", "fork"])
def test_sigkilled_five_times_then_resumed(tmp_path: Path, mode: str) -> None:
    rng = random.Random(20_251)
    path, log = str(tmp_path / "batch.sqlite"), str(tmp_path / "executions")
    args = {"path": path, "log": log, "n": TASKS, "mode": mode, "chunksize": 1,
            "sleep": 0.001 if mode == "persistent" else 0.0}
    for _ in range(KILLS):
        kill_mid_batch(args, progress=rng.randint(30, 300))
        assert done_count(path) < TASKS  # every kill landed mid-batch
    # Resumed to completion: every result, in input order, correct.
    final = start(args)
    out, _ = final.communicate(timeout=90)
    assert final.returncode == 0, out[-500:]
    lines = out.splitlines()
    assert lines[-1] == "END"
    assert [int(line[2:]) for line in lines[:-1]] == [3 * i for i in range(TASKS)]
    # Recorded once each: one row per key, done, the right result.
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT key, state, result FROM tasks ORDER BY key").fetchall()
    assert [key for key, _, _ in rows] == list(range(TASKS))
    assert {state for _, state, _ in rows} == {"done"}
    assert ipcfork.Ledger(path).result(1234) == 3702
    # At least once, and re-run only what was in flight at a kill.
    with open(log) as executions:
        counts = collections.Counter(int(line) for line in executions)
    assert set(counts) == set(range(TASKS))
    reruns = sum(counts.values()) - TASKS
    assert reruns <= KILLS * IN_FLIGHT[mode], (reruns, KILLS * IN_FLIGHT[mode])
    print(f"{mode}: {reruns} tasks ran again after {KILLS} kills (bound "
          f"{KILLS * IN_FLIGHT[mode]})")
    summary = ipcfork.Ledger(path).summary()
    assert (summary.done, summary.failed, summary.uncertain, summary.pending) == (
        TASKS, 0, 0, 0)
    assert summary.runs == KILLS + 1
