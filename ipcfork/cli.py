"""The ``ipcfork`` command: ``ls`` and ``clean`` for ipcfork objects on this machine,
``info`` (the version and which native core path is in use), ``race``, the race
laboratory (``ipcfork/race/``), and ``serve``/``status`` for supervised services
(``ipcfork/service/``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ._os import registry as _registry
from .ledger import command as ledger_command
from .race import command as race_command
from .service import command as service_command

__all__ = ["main"]


def _row(r: _registry.Record) -> dict[str, object]:
    return {**asdict(r), "state": r.state, "in_use": r.in_use}


def _users(r: _registry.Record) -> str:
    parts = []
    if r.attached:
        parts.append(f"{r.attached} {'attached' if r.kind == 'shm' else 'counted'}")
    if r.users:
        parts.append("pids " + ",".join(map(str, r.users)))
    return "; ".join(parts)


def _cmd_ls(args: argparse.Namespace) -> int:
    records = _registry.list_objects()
    if args.json:
        print(json.dumps([_row(r) for r in records], indent=2))
        return 0
    if not records:
        print("no ipcfork objects on this machine")
        return 0
    print(f"{'backend':8} {'kind':10} {'id/name':44} {'creator':>8} {'state':8} users")
    for r in records:
        print(f"{r.backend:8} {r.kind:10} {r.ident:44} {r.creator_pid or '?':>8} "
              f"{r.state:8} {_users(r)}".rstrip())
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    acted, kept = _registry.clean(include_live=args.all, force=args.force)
    for r in acted:
        verb = "removed" if r.exists else "forgot"
        print(f"{verb} {r.backend} {r.kind} {r.ident} (creator {r.creator_pid})")
    for r in kept:
        print(f"kept {r.backend} {r.kind} {r.ident} (creator {r.creator_pid}): in use "
              f"({_users(r)}); --force removes it")
    if not acted and not kept:
        print("nothing to clean")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    from . import __version__
    from ._os import native as _native

    facts = {
        "version": __version__,
        "core": _native.PATH,
        "core_why": _native.WHY,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"ipcfork {facts['version']} on Python {facts['python']} ({facts['platform']})")
    print(f"core: {facts['core']} ({facts['core_why']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipcfork", description="Fork-based multi-tasking with SysV and POSIX IPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list ipcfork objects and whether their creator lives")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=_cmd_ls)
    clean = sub.add_parser(
        "clean", help="remove ipcfork objects whose creator is dead and that nobody uses")
    clean.add_argument("--all", action="store_true",
                       help="remove objects of live creators too")
    clean.add_argument("--force", action="store_true",
                       help="remove objects live processes still use too")
    clean.set_defaults(run=_cmd_clean)
    info = sub.add_parser("info", help="say which core is in use (compiled or ctypes)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_cmd_info)
    race_command.add_parser(sub)
    ledger_command.add_parser(sub)
    service_command.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ipcfork`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
