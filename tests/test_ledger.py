"""Resumable batches (``ledger=``): resume, keys and fingerprints, rerun and hold,
reconciling, failures and crashes, task_key() in every mode, one live run per ledger, bad
input, the ``ipcfork ledger`` command.  Kills and interrupts hit a runner process
(``ledger_runner.py``); the SIGKILL chaos test is in ``test_ledger_chaos.py``."""

from __future__ import annotations

import collections
import ctypes
import faulthandler
import json
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ipcfork
from ipcfork import (
    ChildCrashedError,
    InvalidArgumentError,
    LedgerBusyError,
    LedgerMismatchError,
)
from ipcfork.errors import IpcforkError, ObjectNotFoundError
from ipcfork.ledger.command import format_summary
from ipcfork.pool.forksafety import inherited_connections

RUNNER = str(Path(__file__).with_name("ledger_runner.py"))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "ledger.md"
MODES = {"fork": {}, "persistent": {"tasks_per_child": None}, "zygote": {"zygote": True}}


# -- helpers (module level: persistent workers and the zygote pickle them by name) --------

LOG = {"path": ""}


def logged(i: int) -> int:
    """Append this task's key to the executions file, return 3 * i."""
    fd = os.open(LOG["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ipcfork.task_key()}\n".encode())
    finally:
        os.close(fd)
    return 3 * i


def executions() -> collections.Counter[str]:
    try:
        with open(LOG["path"]) as log:
            return collections.Counter(line.strip() for line in log)
    except FileNotFoundError:
        return collections.Counter()


def with_key(item: Any) -> tuple[Any, Any]:
    return item, ipcfork.task_key()


def fails_on_three(i: int) -> int:
    if i == 3 and not os.path.exists(LOG["path"] + ".fixed"):
        raise ValueError("three is refused")
    return logged(i)


def crashes(i: int) -> int:
    if i == 2:
        os._exit(3)
    if i == 4:
        faulthandler.disable()  # the crash is the point: no dump on stderr
        ctypes.string_at(0)  # SIGSEGV
    return i


def square(i: int) -> int:
    return i * i


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    LOG["path"] = str(tmp_path / "executions")
    return str(tmp_path / "batch.sqlite")


def run_runner(args: dict[str, Any], timeout: float = 60) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, RUNNER, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout.splitlines()


def kill_after(args: dict[str, Any], results: int, signum: int = signal.SIGKILL) -> int:
    """Start a runner, wait until it yielded ``results`` results (committed: the batch
    made progress), send it ``signum``; return its exit status."""
    proc = subprocess.Popen([sys.executable, RUNNER, json.dumps(args)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        for _ in range(results):
            line = proc.stdout.readline()
            assert line.startswith("R "), line
        proc.send_signal(signum)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode


# -- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_a_finished_batch_yields_its_records_and_runs_nothing(ledger: str, mode: str) -> None:
    with ipcfork.ForkPool(2, **MODES[mode]) as pool:
        assert list(pool.map(logged, range(20), ledger=ledger)) == [3 * i for i in range(20)]
        assert sum(executions().values()) == 20
        assert list(pool.map(logged, range(20), ledger=ledger)) == [3 * i for i in range(20)]
        assert sorted(pool.imap_unordered(logged, range(20), ledger=ledger)) == [
            3 * i for i in range(20)]
    assert sum(executions().values()) == 20  # nothing ran again
    assert oct(os.stat(ledger).st_mode & 0o777) == "0o600"


def test_a_longer_batch_runs_only_the_new_items(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        list(pool.map(logged, range(10), ledger=ledger))
        assert list(pool.map(logged, range(15), ledger=ledger)) == [3 * i for i in range(15)]
    assert executions() == {str(i): 1 for i in range(15)}


def test_a_closed_iterator_leaves_the_rest_for_the_next_run(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        results = pool.imap_unordered(logged, range(40), ledger=ledger)
        taken = [next(results) for _ in range(5)]
        results.close()
        summary = ipcfork.Ledger(ledger).summary()
        assert summary.done >= 5 and summary.pending is not None
        assert sorted(pool.imap_unordered(logged, range(40), ledger=ledger)) == [
            3 * i for i in range(40)]
    assert len(taken) == 5
    counts = executions()
    assert set(counts) == {str(i) for i in range(40)}
    # Cancelled before they started: put back, never counted as uncertain; run once.
    assert sum(counts.values()) - 40 <= 8  # at most the window that was running


@pytest.mark.parametrize("chunksize", [None, 3])
def test_chunks_record_each_item_and_fail_only_the_failing_item(
        ledger: str, chunksize: int | None) -> None:
    with ipcfork.ForkPool(2, tasks_per_child=None) as pool, pytest.raises(
            ValueError, match="three is refused"):
        list(pool.map(fails_on_three, range(10), ledger=ledger, chunksize=chunksize))
    with sqlite3.connect(ledger) as db:
        states = dict(db.execute("SELECT key, state FROM tasks"))
    assert states[3] == "failed"
    assert all(states.get(i, "done") == "done" for i in range(10) if i != 3)


def test_several_iterables_and_progress(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        assert list(pool.map(add, range(5), range(10, 15), ledger=ledger, progress=True)) == [
            10, 12, 14, 16, 18]
        assert list(pool.map(add, range(5), range(10, 15), ledger=ledger)) == [
            10, 12, 14, 16, 18]


# -- keys and fingerprints --------------------------------------------------------------


def test_other_items_under_the_same_keys_are_refused(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        list(pool.map(square, [1, 2, 3], ledger=ledger))
        with pytest.raises(LedgerMismatchError, match=r"key 0 differs") as info:
            list(pool.map(square, [9, 2, 3], ledger=ledger))
        assert ledger in str(info.value)
        with pytest.raises(LedgerMismatchError, match=r"function is '.*square'"):
            list(pool.map(logged, [1, 2, 3], ledger=ledger))
        with pytest.raises(LedgerMismatchError, match="kind of key is 'index'"):
            list(pool.map(square, [1, 2, 3], ledger=ledger, key=str))


def test_fingerprints_hold_across_hash_seeds(tmp_path: Path) -> None:
    code = ("from ipcfork.ledger.keys import fingerprint_of\n"
            "item = {'b': {'x', 'y', 'z'}, 'a': [1, 2.5, None, (b'q', frozenset('pq'))]}\n"
            "print(fingerprint_of(item).hex())")
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
              for seed in ("1", "2", "3")}
    assert len(prints) == 1


def test_key_gives_stable_identities(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        words = ["pear", "fig", "apple"]
        assert list(pool.map(with_key, words, ledger=ledger, key=str.upper)) == [
            ("pear", "PEAR"), ("fig", "FIG"), ("apple", "APPLE")]
        # Reordered and grown: recorded ones are found by key, the new one runs.
        assert list(pool.map(with_key, ["kiwi", "apple", "pear"], ledger=ledger,
                             key=str.upper)) == [("kiwi", "KIWI"), ("apple", "APPLE"),
                                                 ("pear", "PEAR")]


def test_duplicate_keys_are_an_error_naming_the_key(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool, pytest.raises(InvalidArgumentError,
                       match=r"key 'b' appears twice in the batch \(items 0 and 2\)"):
        list(pool.map(square, [1, 2, 3], ledger=ledger, key=lambda i: "ab"[i % 2]))


@pytest.mark.parametrize("mode", list(MODES))
def test_task_key_inside_tasks_in_every_mode(ledger: str, mode: str) -> None:
    with ipcfork.ForkPool(2, **MODES[mode]) as pool:
        assert list(pool.map(with_key, [5, 6], ledger=ledger)) == [(5, 0), (6, 1)]
        assert sorted(pool.imap_unordered(with_key, [7, 8], ledger=ledger + "2",
                                          key=lambda i: f"k{i}")) == [(7, "k7"), (8, "k8")]
        if mode == "persistent":
            assert list(pool.map(with_key, range(6), ledger=ledger + "3", chunksize=4)) == [
                (i, i) for i in range(6)]
    with pytest.raises(IpcforkError, match="outside a ledger task"):
        ipcfork.task_key()


# -- failures -----------------------------------------------------------------------------


def test_retry_failed_true_and_false(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        with pytest.raises(ValueError, match="three is refused"):
            list(pool.map(fails_on_three, range(6), ledger=ledger))
        with open(LOG["path"] + ".fixed", "w"):
            pass  # item 3 would succeed now
        ran = sum(executions().values())
        with pytest.raises(ValueError, match="three is refused") as info:
            list(pool.map(fails_on_three, range(6), ledger=ledger, retry_failed=False))
        assert "three is refused" in str(info.value.__cause__)  # the child's traceback
        assert executions()["3"] == 0
        assert list(pool.map(fails_on_three, range(6), ledger=ledger)) == [
            3 * i for i in range(6)]
    assert executions()["3"] == 1
    assert sum(executions().values()) >= ran + 1


def test_crashed_tasks_are_recorded_as_failed(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        results = pool.imap_unordered(crashes, range(6), ledger=ledger, in_flight=1)
        got = []
        with pytest.raises(ChildCrashedError, match="exited with status 3"):
            got.extend(results)
        results = pool.imap_unordered(crashes, range(6), ledger=ledger, in_flight=1,
                                      retry_failed=False)
        with pytest.raises(ChildCrashedError):
            got.extend(results)
        with pytest.raises(ChildCrashedError):  # a batch without item 2: item 4 crashes
            list(pool.imap_unordered(crashes, [0, 1, 3, 4, 5], ledger=ledger + "-b"))
    failures = ipcfork.Ledger(ledger + "-b").failures()
    assert list(failures) == [3] and "signal 11" in failures[3]
    summary = ipcfork.Ledger(ledger).summary()
    assert summary.failures == {"ipcfork.errors.ChildCrashedError": 1}


# -- rerun and hold after a crash -------------------------------------------------------


def _uncertain_after_kill(ledger: str, **extra: Any) -> list[int]:
    args = {"path": ledger, "log": LOG["path"], "n": 400, "mode": "persistent",
            "chunksize": 1, "sleep": 0.002, **extra}
    assert kill_after(args, 50) == -signal.SIGKILL
    held = ipcfork.Ledger(ledger).uncertain()
    assert held, "the kill found nothing in flight"
    return [int(k) for k in held]


def test_hold_never_reruns_a_started_task(ledger: str) -> None:
    held = _uncertain_after_kill(ledger)
    before = executions()
    args = {"path": ledger, "log": LOG["path"], "n": 400, "mode": "persistent",
            "chunksize": 1, "uncertain": "hold"}
    status, out = run_runner(args)
    assert status == 3, out[-3:]
    assert out[-1] == f"HELD {json.dumps(held)}"
    # map stops yielding at the first held position, so no result lands at another's place
    assert [line for line in out if line.startswith("R ")] == [
        f"R {3 * i}" for i in range(min(held))]
    after = executions()
    assert all(after[str(k)] == before[str(k)] for k in held)  # none of them ran again
    assert all(n == 1 for n in after.values())  # and nothing ran twice
    summary = ipcfork.Ledger(ledger).summary()
    assert summary.uncertain == len(held) and summary.done == 400 - len(held)
    # Reconcile: the first happened (settle), the others are run again (forget).
    ledger_ = ipcfork.Ledger(ledger)
    ledger_.settle(held[0], 3 * held[0])
    for key in held[1:]:
        ledger_.forget(key)
    status, out = run_runner(args)
    assert status == 0 and out[-1] == "END"
    assert out[:-1] == [f"R {3 * i}" for i in range(400)]
    assert executions()[str(held[0])] == before[str(held[0])]


def test_rerun_is_the_default(ledger: str) -> None:
    held = _uncertain_after_kill(ledger)
    status, out = run_runner({"path": ledger, "log": LOG["path"], "n": 400,
                              "mode": "persistent", "chunksize": 1})
    assert status == 0 and out[:-1] == [f"R {3 * i}" for i in range(400)]
    assert all(executions()[str(k)] >= 1 for k in held)


def test_hold_with_imap_unordered_yields_everything_else(ledger: str) -> None:
    held = _uncertain_after_kill(ledger)
    status, out = run_runner({"path": ledger, "log": LOG["path"], "n": 400,
                              "mode": "persistent", "uncertain": "hold", "unordered": True})
    assert status == 3
    values = sorted(int(line[2:]) for line in out if line.startswith("R "))
    assert values == [3 * i for i in range(400) if i not in held]


def test_ctrl_c_then_resume(ledger: str) -> None:
    args = {"path": ledger, "log": LOG["path"], "n": 300, "mode": "fork", "sleep": 0.002}
    status = kill_after(args, 20, signal.SIGINT)
    assert status != 0
    summary = ipcfork.Ledger(ledger).summary()
    assert summary.done >= 20 and summary.live_pid is None
    status, out = run_runner(args)
    assert status == 0 and out[:-1] == [f"R {3 * i}" for i in range(300)]
    counts = executions()
    assert set(counts) == {str(i) for i in range(300)}
    assert sum(counts.values()) - 300 <= 8  # only what was in flight ran again


def test_settle_and_forget_check_their_arguments(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        list(pool.map(square, range(3), ledger=ledger))
    book = ipcfork.Ledger(ledger)
    with pytest.raises(InvalidArgumentError, match="done already"):
        book.settle(1, 1)
    with pytest.raises(InvalidArgumentError, match="no task 7"):
        book.forget(7)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        book.settle(1)
    book.forget(1)
    assert book.summary().pending == 1
    with ipcfork.ForkPool(2) as pool:
        assert list(pool.map(square, range(3), ledger=book)) == [0, 1, 4]


# -- one live run per ledger --------------------------------------------------------------


def test_a_second_live_run_is_refused_naming_its_pid(ledger: str) -> None:
    args = {"path": ledger, "log": LOG["path"], "n": 100_000, "mode": "persistent",
            "chunksize": 1, "sleep": 0.001}
    proc = subprocess.Popen([sys.executable, RUNNER, json.dumps(args)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("R ")
        with ipcfork.ForkPool(1) as pool, pytest.raises(
                LedgerBusyError, match=f"pid {proc.pid}") as info:
            list(pool.map(square, range(3), ledger=ledger))
        assert info.value.pid == proc.pid
        with pytest.raises(LedgerBusyError):
            ipcfork.Ledger(ledger).forget(0)
        summary = ipcfork.Ledger(ledger).summary()
        assert summary.live_pid == proc.pid and summary.uncertain == 0
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_a_second_run_in_the_same_process_is_refused(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        first = pool.imap_unordered(square, range(50), ledger=ledger)
        next(first)
        with pytest.raises(LedgerBusyError, match="this process"):
            list(pool.map(square, range(50), ledger=ledger))
        first.close()
        assert sorted(pool.imap_unordered(square, range(50), ledger=ledger)) == [
            i * i for i in range(50)]


# -- bad input ----------------------------------------------------------------------------


def test_bad_arguments_are_named(ledger: str, tmp_path: Path) -> None:
    with ipcfork.ForkPool(1) as pool:
        with pytest.raises(InvalidArgumentError, match="uncertain must be 'rerun' or 'hold'"):
            pool.map(square, [1], ledger=ledger, uncertain="maybe")
        with pytest.raises(InvalidArgumentError, match="key must be a callable"):
            pool.map(square, [1], ledger=ledger, key=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="retry_failed must be"):
            pool.map(square, [1], ledger=ledger, retry_failed="no")  # type: ignore[arg-type]
        with pytest.raises(ObjectNotFoundError, match=r"directory .* does not exist"):
            pool.map(square, [1], ledger=str(tmp_path / "nowhere" / "b.sqlite"))
        with pytest.raises(InvalidArgumentError, match="not supported with ledger"):
            pool.map(square, [1], ledger=ledger, timeout=5)
        with pytest.raises(InvalidArgumentError, match=r"must return a str or an int, not list"):
            list(pool.map(square, [1], ledger=ledger, key=lambda i: [i]))
        with pytest.raises(InvalidArgumentError, match="cannot be fingerprinted"):
            list(pool.map(square, [lambda: 1], ledger=ledger + "-f"))


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("shopping list\n" * 100)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with ipcfork.ForkPool(1) as pool:
        with pytest.raises(InvalidArgumentError, match="not an ipcfork ledger"):
            list(pool.map(square, [1], ledger=str(text)))
        with pytest.raises(InvalidArgumentError, match="another program"):
            list(pool.map(square, [1], ledger=str(other)))
    assert text.read_text() == "shopping list\n" * 100  # untouched
    with sqlite3.connect(other) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with pytest.raises(ObjectNotFoundError, match="no ledger at"):
        ipcfork.Ledger(tmp_path / "missing.sqlite").summary()
    assert not (tmp_path / "missing.sqlite").exists()


# -- the command --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipcfork", "ledger", *args],
                          capture_output=True, text=True, timeout=60)


def _doc_sample() -> tuple[str, str]:
    """The command and the output docs/ledger.md shows for it."""
    text = DOCS.read_text().split("<!-- ledger-command -->", 1)[1]
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    command, _, output = block.partition("\n")
    return command, output.rstrip("\n")


def test_the_command_prints_what_the_docs_show(tmp_path: Path) -> None:
    """The documented batch (10 items, item 3 refused), then the command: every line as
    the docs print it, but the throughput's figures and the path."""
    command, sample = _doc_sample()
    assert command == "$ ipcfork ledger batch.sqlite"
    ledger = str(tmp_path / "batch.sqlite")
    LOG["path"] = str(tmp_path / "executions")
    with ipcfork.ForkPool(2) as pool, pytest.raises(ValueError):
        list(pool.map(fails_on_three, range(10), ledger=ledger))
    run = _cli(ledger)
    assert run.returncode == 0, run.stderr
    shown = run.stdout.rstrip("\n").replace(ledger, "batch.sqlite")
    def blur(text: str) -> str:
        text = re.sub(r"^(throughput) .*$", r"\1 ...", text, flags=re.M)
        return re.sub(r"^(  (done|pending|uncertain) +)\d+$", r"\1N", text, flags=re.M)
    assert blur(shown.replace("test_ledger.fails_on_three", "batch.send")) == blur(sample)
    summary = ipcfork.Ledger(ledger).summary()
    assert format_summary(summary) == run.stdout.rstrip("\n")
    assert summary.failed == 1 and summary.failures == {"ValueError": 1}


def test_the_command_json_shape(ledger: str) -> None:
    with ipcfork.ForkPool(2) as pool:
        list(pool.map(square, range(10), ledger=ledger))
    run = _cli(ledger, "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert set(doc) == {"path", "function", "keys", "total", "counts", "failures",
                        "attempts", "runs", "live_pid", "throughput"}
    assert doc["counts"] == {"done": 10, "failed": 0, "uncertain": 0, "running": 0,
                             "pending": 0}
    assert doc["function"] == "test_ledger.square" and doc["total"] == 10
    assert set(doc["throughput"]) == {"tasks", "seconds", "per_second"}
    assert doc["throughput"]["tasks"] == 10 and doc["throughput"]["per_second"] > 0


def test_the_command_refuses_what_is_not_a_ledger(tmp_path: Path) -> None:
    run = _cli(str(tmp_path / "missing.sqlite"))
    assert run.returncode == 1 and "no ledger at" in run.stderr
    assert not (tmp_path / "missing.sqlite").exists()


def test_uncertain_tasks_error_pickles_its_keys() -> None:
    error = ipcfork.UncertainTasksError("held", keys=[3, "x"], path="b.sqlite")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.keys, clone.path, str(clone)) == ([3, "x"], "b.sqlite", "held")


def test_the_ledger_is_not_reported_as_an_inherited_connection(ledger: str) -> None:
    with ipcfork.ForkPool(1) as pool:
        results = pool.imap_unordered(square, range(20), ledger=ledger)
        next(results)
        assert not [c for c in inherited_connections() if c.kind == "SQLite"]
        results.close()
