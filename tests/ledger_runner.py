"""A batch on a ledger, run as its own process by the ledger tests (so that it can be
SIGKILLed or interrupted like a real parent).

``python tests/ledger_runner.py '{"path": ..., "log": ..., "n": ...}'``; options: ``mode``
("fork", "persistent", "zygote"), ``sleep`` (seconds per task), ``chunksize``,
``uncertain``, ``retry_failed``, ``fail`` (items that raise), ``unordered``.

Each task appends its key to ``log`` (a file opened O_APPEND, one short write per line:
the executions, counted by the tests) before it works.  The runner prints ``R value`` per
result as it is yielded (flushed, so a test can wait for progress), then ``END``; ``HELD
[keys]`` and exit 3 for UncertainTasksError; ``ERROR type`` and exit 4 for another error.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ipcfork

ARGS = json.loads(sys.argv[1])
LOG: str = ARGS["log"]
SLEEP: float = ARGS.get("sleep", 0.0)
FAIL = set(ARGS.get("fail", ()))


def work(i: int) -> int:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ipcfork.task_key()}\n".encode())
    finally:
        os.close(fd)
    if SLEEP:
        time.sleep(SLEEP)
    if i in FAIL:
        raise ValueError(f"item {i} refused")
    return i * 3


def main() -> int:
    mode = ARGS.get("mode", "persistent")
    options = {"fork": {}, "persistent": {"tasks_per_child": None},
               "zygote": {"zygote": True}}[mode]
    batch = {"ledger": ARGS["path"], "uncertain": ARGS.get("uncertain", "rerun"),
             "retry_failed": ARGS.get("retry_failed", True)}
    if "chunksize" in ARGS:
        batch["chunksize"] = ARGS["chunksize"]
    with ipcfork.ForkPool(2, **options) as pool:
        if ARGS.get("unordered"):
            results = pool.imap_unordered(work, range(ARGS["n"]), **batch)
        else:
            results = pool.map(work, range(ARGS["n"]), **batch)
        try:
            for value in results:
                sys.stdout.write(f"R {value}\n")
                sys.stdout.flush()
        except ipcfork.UncertainTasksError as exc:
            print("HELD", json.dumps(exc.keys), flush=True)
            return 3
        except Exception as exc:
            print("ERROR", type(exc).__name__, flush=True)
            return 4
    print("END", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
