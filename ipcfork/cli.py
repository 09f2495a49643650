"""The ``ipcfork`` command: ``ls`` and ``clean`` for ipcfork objects on this machine, and
``race``, the race laboratory (``ipcfork/race/``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from . import _registry
from .race import command as race_command

__all__ = ["main"]


def _cmd_ls(args: argparse.Namespace) -> int:
    records = _registry.list_objects()
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2))
        return 0
    if not records:
        print("no ipcfork objects on this machine")
        return 0
    print(f"{'backend':8} {'kind':10} {'id/name':44} {'creator':>8} {'state':8}")
    for r in records:
        state = "live" if r.creator_alive else "orphan"
        if not r.exists:
            state = "gone"
        print(f"{r.backend:8} {r.kind:10} {r.ident:44} {r.creator_pid or '?':>8} {state:8}")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    acted = _registry.clean(include_live=args.all)
    for r in acted:
        verb = "removed" if r.exists else "forgot"
        print(f"{verb} {r.backend} {r.kind} {r.ident} (creator {r.creator_pid})")
    if not acted:
        print("nothing to clean")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipcfork", description="Fork-based multi-tasking with SysV and POSIX IPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list ipcfork objects and whether their creator lives")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=_cmd_ls)
    clean = sub.add_parser("clean", help="remove ipcfork objects whose creator is dead")
    clean.add_argument("--all", action="store_true",
                       help="remove objects of live creators too")
    clean.set_defaults(run=_cmd_clean)
    race_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ipcfork`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
