"""The service mode's two figures, against gunicorn's arbiter in the same run:

1. **Stop:** SIGTERM to the supervisor until it has exited (every worker reaped), with 4 idle
   workers.  ipcfork's workers idle in ``ctx.wait(3600)``; gunicorn's sync workers idle in
   their own loop.  Target: < 0.2 s.
2. **Replace:** SIGKILL to one worker until its replacement runs.  ipcfork: until the new
   worker's first heartbeat is in shared memory (reported with the 0.1 s backoff taken
   out); gunicorn: until the new worker logs "Booting worker" (it has no backoff).
   Target: < 50 ms plus the backoff.

Usage: ``python benchmarks/bench_service.py [--reps N]``.  Medians over round-robin
repetitions; other processes may share the machine.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import markdown_table, verdict

from ipcfork import Service, WorkerContext
from ipcfork.service.restarts import FIRST_DELAY
from ipcfork.service.status import StatusTable

WORKERS = 4
_APP = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'']\n"


def idle(ctx: WorkerContext) -> None:
    ctx.heartbeat()
    while not ctx.wait(3600):
        ctx.heartbeat()


class IpcforkService:
    """A Service forked from here, with a notify socket to learn when it is ready."""

    def __init__(self, directory: Path) -> None:
        path = directory / f"notify.{time.monotonic_ns()}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.environ["NOTIFY_SOCKET"] = str(path)
                Service(idle, WORKERS, name="bench").run()
                code = 0
            finally:
                os._exit(code)
        self._wait_for("READY=1")
        self.table = StatusTable.open(self.pid)
        self._until(lambda: len(self._beating()) == WORKERS)

    def _wait_for(self, line: str) -> None:
        self.notify.settimeout(30)
        while line not in self.notify.recv(65536).decode():
            pass

    def _beating(self) -> dict[int, int]:
        """slot -> pid of the running workers that have sent a heartbeat."""
        return {r.slot: r.pid for r in self.table.rows()
                if r.state == "running" and r.units > 0}

    @staticmethod
    def _until(condition: object, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not get there in time")
            time.sleep(0.0002)

    def replace_one(self) -> float:
        victim = self._beating()[0]
        began = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        self._until(lambda: self._beating().get(0, victim) != victim)
        return time.monotonic() - began - FIRST_DELAY

    def stop(self) -> float:
        self.table.close()
        began = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        elapsed = time.monotonic() - began
        self.notify.close()
        return elapsed


class Gunicorn:
    """A gunicorn arbiter with sync workers on a unix socket; its log lines, timestamped as
    they arrive, say when workers boot."""

    def __init__(self, directory: Path) -> None:
        (directory / "bench_app.py").write_text(_APP)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "--bind",
             f"unix:{directory}/g.{time.monotonic_ns()}.sock", "--log-level", "info",
             "bench_app:app"], cwd=directory, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.workers: list[int] = []
        while len(self.workers) < WORKERS:
            self.workers.append(self._next_boot())

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put((time.monotonic(), line))

    def _next_boot(self) -> int:
        while True:
            _, line = self.lines.get(timeout=30)
            if "Booting worker with pid" in line:
                return int(line.rsplit(":", 1)[1])

    def replace_one(self) -> float:
        victim = self.workers.pop(0)
        began = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while True:
            arrived, line = self.lines.get(timeout=30)
            if "Booting worker with pid" in line:
                self.workers.append(int(line.rsplit(":", 1)[1]))
                return arrived - began

    def stop(self) -> float:
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        elapsed = time.monotonic() - began
        assert self.process.stderr is not None
        self.process.stderr.close()
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("ipcfork stop", "gunicorn stop", "ipcfork replace",
                                        "gunicorn replace")}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for rep in range(args.reps):
            kinds = [("ipcfork", IpcforkService), ("gunicorn", Gunicorn)]
            for label, kind in kinds if rep % 2 == 0 else kinds[::-1]:
                running = kind(directory)
                samples[f"{label} replace"].append(running.replace_one())
                samples[f"{label} stop"].append(running.stop())
    rows = [(label, f"{statistics.median(values) * 1000:.1f} ms",
             f"{min(values) * 1000:.1f}..{max(values) * 1000:.1f} ms")
            for label, values in samples.items()]
    print(f"## Service mode: {WORKERS} idle workers, {args.reps} repetitions (medians)\n")
    print(markdown_table(("figure", "median", "range"), rows))
    stop = statistics.median(samples["ipcfork stop"])
    replace = statistics.median(samples["ipcfork replace"])
    print(f"\n- target: SIGTERM to exit {stop * 1000:.1f} ms, target < 200 ms: "
          f"{verdict(stop < 0.2)} (gunicorn {statistics.median(samples['gunicorn stop']):.2f} s)")
    print(f"- target: replacing a killed worker {replace * 1000:.1f} ms plus the "
          f"{FIRST_DELAY * 1000:.0f} ms backoff, target < 50 ms: {verdict(replace < 0.05)} "
          f"(gunicorn {statistics.median(samples['gunicorn replace']) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
