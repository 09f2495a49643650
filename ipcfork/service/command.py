"""``ipcfork serve MODULE:FUNCTION`` runs a service; ``ipcfork status PIDFILE`` reads a live
service's status table (shared memory: no signal is sent, the service does not notice)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .._os.recordlock import holder_of_path
from ..errors import IpcforkError, ObjectNotFoundError
from .pidfile import read_pid
from .report import status_lines

__all__ = ["EXIT_NOT_RUNNING", "add_parsers"]

EXIT_NOT_RUNNING = 3  # as LSB init scripts' "status": the program is not running


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def add_parsers(sub: Any) -> None:
    """Add ``serve`` and ``status`` to the ``ipcfork`` command's subparsers."""
    serve = sub.add_parser("serve", help="run MODULE:FUNCTION as a supervised service")
    serve.add_argument("target", metavar="MODULE:FUNCTION",
                       help="the function each worker runs, called with a WorkerContext")
    serve.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    serve.add_argument("--pidfile", help="lock this pidfile while the service runs")
    serve.add_argument("--name", help="the name shown in logs and status")
    serve.add_argument("--heartbeat-timeout", type=_seconds, default=30.0, metavar="S",
                       help="replace a worker silent this long (default 30; 0: never)")
    serve.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="S",
                       help="kill a stopping worker after this long (default 30)")
    serve.add_argument("--max-restarts", type=int, default=10, metavar="N",
                       help="stop after N+1 worker exits within the window (default 10)")
    serve.add_argument("--restart-window", type=_seconds, default=60.0, metavar="S",
                       help="the crash-loop window in seconds (default 60)")
    serve.set_defaults(run=_cmd_serve)
    status = sub.add_parser("status", help="show a running service's workers")
    status.add_argument("pidfile", metavar="PIDFILE")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_cmd_status)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .service import Service

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(process)d] %(levelname)s %(message)s")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the current directory's modules
    try:
        service = Service(args.target, args.workers, pidfile=args.pidfile, name=args.name,
                          heartbeat_timeout=args.heartbeat_timeout or None,
                          drain_timeout=args.drain_timeout, max_restarts=args.max_restarts,
                          restart_window=args.restart_window)
        service.run()
    except IpcforkError as exc:
        print(f"ipcfork serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import StatusTable

    # The lock's holder is the truth: the content may be mid-replace while a service
    # starts, or name a pid that died (and may have been reused) when the lock is free.
    holder = holder_of_path(args.pidfile)  # looks, never takes: a starting service wins
    if holder is None:
        pid = read_pid(args.pidfile)
        why = ("no pidfile" if not os.path.exists(args.pidfile) else
               "no pid in the pidfile" if pid is None else
               f"stale pidfile: pid {pid} does not hold it")
        if args.json:
            print(json.dumps({"running": False, "pidfile": args.pidfile, "reason": why}))
        else:
            print(f"not running ({why}): {args.pidfile}")
        return EXIT_NOT_RUNNING
    try:
        table = StatusTable.open(holder)
    except ObjectNotFoundError:  # locked the pidfile, not yet made its table: starting
        starting: dict[str, object] = {
            "name": None, "pid": holder, "state": "starting", "generation": 0,
            "workers_wanted": 0, "uptime": 0.0, "restarts": 0, "workers": []}
        if args.json:
            print(json.dumps({"running": True, "pidfile": args.pidfile, **starting}))
        else:
            print(f"service (pid {holder}): starting")
        return 0
    except IpcforkError as exc:
        print(f"ipcfork status: pid {holder} holds {args.pidfile} but its status table "
              f"cannot be read: {exc}", file=sys.stderr)
        return 1
    try:
        summary = table.summary()
    finally:
        table.close()
    if args.json:
        print(json.dumps({"running": True, "pidfile": args.pidfile, **summary}, indent=2))
    else:
        print("\n".join(status_lines(summary)))
    return 0
