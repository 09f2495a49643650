"""``ipcfork ledger PATH [--json]``: what a resumable batch's ledger says.

Exit status: 0 when the ledger was read, 1 when it could not be (no ledger at PATH, not a
ledger, unreadable).  The command takes no lock and writes nothing, so it is safe to run
while the batch runs.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from typing import Any

from ..errors import IpcforkError
from .ledger import Ledger
from .summary import Summary

__all__ = ["add_parser", "format_summary", "run_command"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``ledger`` subcommand to the ``ipcfork`` command's subparsers ``sub``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "ledger", help="summarise a resumable batch's ledger: done, failed, uncertain, "
                       "pending, failures by type, throughput",
        description="Summarise the ledger of a resumable batch (ForkPool.map(..., "
                    "ledger=PATH)): tasks done, failed, uncertain (started by a run "
                    "that died, no outcome), running, pending; failures by exception "
                    "type; throughput over the recorded timings.")
    parser.add_argument("path", metavar="PATH", help="the ledger's database file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(run=run_command)
    return parser


def format_summary(summary: Summary) -> str:
    """The human-readable report (what ``ipcfork ledger PATH`` prints)."""
    keys = {"index": "the input's index", "key": "key(item)"}.get(summary.keys or "", "?")
    live = f"pid {summary.live_pid} live" if summary.live_pid is not None else "none live"
    total = "?" if summary.total is None else str(summary.total)
    lines = [
        f"ledger {summary.path}",
        f"function   {summary.function or '?'} (keys: {keys})",
        f"runs       {summary.runs} ({live})",
        f"tasks      {total}",
    ]
    counts = [("done", summary.done), ("failed", summary.failed),
              ("uncertain", summary.uncertain), ("running", summary.running),
              ("pending", summary.pending)]
    for name, count in counts:
        lines.append(f"  {name:<10}{'?' if count is None else count:>8}")
    if summary.failures:
        lines.append("failures by type")
        width = max(len(name or "?") for name in summary.failures)
        lines += [f"  {name or '?':<{width}}  {count:>6}"
                  for name, count in summary.failures.items()]
    rate = summary.throughput
    if rate is None:
        lines.append("throughput no task has finished")
    else:
        lines.append(f"throughput {rate:,.1f} tasks/s ({summary.finished} tasks in "
                     f"{summary.busy_seconds:.2f} s of run time)")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    """Run ``ipcfork ledger`` with parsed ``args``; returns the exit status."""
    try:
        summary = Ledger(args.path).summary()
    except (IpcforkError, OSError, sqlite3.Error) as exc:
        print(f"ipcfork ledger: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print(format_summary(summary))
    return 0
