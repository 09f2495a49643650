"""The seed's rules as ForkPool features: logs handled in the parent, initializer in each
child, a load guard, progress display."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ipcfork import ForkPool


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[_Collect]:
    handler = _Collect()
    logger = logging.getLogger("ipcfork-test-job")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def log_and_return(i: int) -> int:
    logger = logging.getLogger("ipcfork-test-job")
    logger.info("item %d from %d", i, os.getpid())
    try:
        raise ValueError("inside")
    except ValueError:
        logger.exception("with a traceback")
    return i


@pytest.mark.parametrize("tasks_per_child", [1, None])
def test_child_log_records_reach_parent_handlers_first(collected: _Collect,
                                                       tasks_per_child: int | None) -> None:
    with ForkPool(2, tasks_per_child=tasks_per_child) as pool:
        future = pool.submit(log_and_return, 5)
        assert future.result(timeout=30) == 5
        # Records are handled before the future resolves: no wait needed here.
        messages = [r.getMessage() for r in collected.records]
        assert f"item 5 from {future.record.pid}" in messages
        traced = [r for r in collected.records if r.getMessage() == "with a traceback"]
        assert traced and "ValueError: inside" in (traced[0].exc_text or "")
        assert all(r.process == future.record.pid for r in collected.records)


def test_logs_can_stay_in_children(collected: _Collect) -> None:
    with ForkPool(1, forward_logs=False) as pool:
        assert pool.submit(log_and_return, 1).result(timeout=30) == 1
    assert collected.records == []


def test_initializer_runs_in_each_child() -> None:
    with ForkPool(2, initializer=os.environ.__setitem__,
                  initargs=("IPCFORK_TEST_INIT", "fresh")) as pool:
        assert pool.submit(os.environ.get, "IPCFORK_TEST_INIT").result(timeout=30) == "fresh"
    assert "IPCFORK_TEST_INIT" not in os.environ


def test_load_guard_still_runs_one_task_at_a_time() -> None:
    # A load limit below any real load: forks are held back to one at a time, never to none.
    with ForkPool(4, max_load=-1.0) as pool:
        assert sorted(pool.imap_unordered(abs, range(-5, 5))) == sorted(map(abs, range(-5, 5)))


def test_progress_counts_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain fallback
    stream = io.StringIO()
    stream.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", stream)
    with ForkPool(2) as pool:
        assert sorted(pool.imap_unordered(abs, [-1, -2, -3], progress=True)) == [1, 2, 3]
        assert list(pool.map(abs, [-4, -5], progress=True)) == [4, 5]
    text = stream.getvalue()
    assert "abs: 3/3" in text and "abs: 2/2" in text


def _stamp_emitter(record: logging.LogRecord) -> bool:
    record.emitter = os.getpid()
    return True


def _log_to_file(message: str) -> int:
    logging.getLogger("ipcfork-test-file").warning(message)
    logging.getLogger("ipcfork-test-file.child").warning(message + " from the child logger")
    return os.getpid()


@pytest.mark.parametrize("propagate", [True, False])
def test_a_named_loggers_own_handler_writes_each_record_once_in_the_parent(
        tmp_path: Any, propagate: bool) -> None:
    # The child inherits the parent's handlers; a named logger's file handler left there
    # once wrote each record in the child and again in the parent (after forwarding).
    path = tmp_path / "job.log"
    handler = logging.FileHandler(path)
    handler.addFilter(_stamp_emitter)  # runs in the process whose handler writes
    handler.setFormatter(logging.Formatter("%(emitter)d %(process)d %(message)s"))
    logger = logging.getLogger("ipcfork-test-file")
    logger.addHandler(handler)
    logger.propagate = propagate
    root_seen = _Collect()
    logging.getLogger().addHandler(root_seen)
    try:
        with ForkPool(1) as pool:
            child = pool.submit(_log_to_file, "hello").result(timeout=30)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logging.getLogger().removeHandler(root_seen)
        handler.close()
    lines = path.read_text().splitlines()
    here = os.getpid()  # written by the parent only, once each
    assert lines == [f"{here} {child} hello", f"{here} {child} hello from the child logger"]
    reached_root = [r.getMessage() for r in root_seen.records if r.name.startswith(
        "ipcfork-test-file")]
    assert reached_root == (["hello", "hello from the child logger"] if propagate else [])
