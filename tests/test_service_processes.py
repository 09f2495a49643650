"""What a service leaves behind, and who may start one: descendants reaped and killed at
stop and when the supervisor is SIGKILLed, the pidfile refused, taken over and checked, and
the ``serve`` / ``status`` commands with their printed output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from service_kit import EXIT_ALREADY_RUNNING, RunningService, Start, steady, wait_gone

from ipcfork import (
    InvalidArgumentError,
    Service,
    ServiceRunningError,
    UnsafeObjectError,
    WorkerContext,
)
from ipcfork.cli import main
from ipcfork.service.descendants import descendants
from ipcfork.testing import snapshot


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def spawner(out: Path) -> Callable[[WorkerContext], None]:
    """A worker that starts a program (``sleep``) and orphans a forked grandchild, writes
    ``worker child orphan`` pids to ``out``, then runs steadily."""

    def work(ctx: WorkerContext) -> None:
        program = subprocess.Popen(["sleep", "3600"])
        read_end, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:  # leaves an orphan: its own child outlives it
            orphan = os.fork()
            if orphan == 0:
                os.close(read_end)
                os.close(write_end)
                while True:
                    time.sleep(3600)
            os.write(write_end, str(orphan).encode())
            os._exit(0)
        os.waitpid(middle, 0)
        os.close(write_end)
        orphan = int(os.read(read_end, 32))
        os.close(read_end)
        with open(out, "a") as file:
            file.write(f"{os.getpid()} {program.pid} {orphan}\n")
        steady(ctx)

    return work


def _wait_for_lines(path: Path, count: int, service: RunningService) -> list[list[int]]:
    # The workers write before their first heartbeat; READY only says they were forked.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count and all(row["units"] > 0 for row in service.running()):
            return [[int(pid) for pid in line.split()] for line in lines]
        time.sleep(0.01)
    raise AssertionError(f"the workers did not report within 20 s:\n{service.log()}")


def test_orphans_are_reaped_by_the_supervisor_and_nothing_survives_a_stop(
        start: Start, tmp_path: Path) -> None:
    out = tmp_path / "pids"
    service = start(spawner(out), workers=2)
    service.notify.wait_for("READY=1")
    rows = _wait_for_lines(out, 2, service)
    for worker, program, orphan in rows:
        assert _parent_of(program) == worker
        assert _parent_of(orphan) == service.pid  # the subreaper adopted it
    everything = [pid for row in rows for pid in row]
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert wait_gone(everything, timeout=1.0) == []  # already gone when run() returned


def test_a_sigkilled_supervisor_leaves_no_process_behind(start: Start, tmp_path: Path) -> None:
    out = tmp_path / "pids"
    service = start(spawner(out), workers=2)
    service.notify.wait_for("READY=1")
    rows = _wait_for_lines(out, 2, service)
    below = descendants(service.pid)  # workers, their programs, orphans and the sentinel
    assert set(below) >= {pid for row in rows for pid in row}
    assert len(below) == 2 * 3 + 1
    service.kill(signal.SIGKILL)
    assert service.wait() == -signal.SIGKILL
    assert wait_gone(below, timeout=10.0) == []


def test_a_second_service_is_refused_then_a_stale_pidfile_is_taken_over(
        start: Start, tmp_path: Path) -> None:
    pidfile = str(tmp_path / "svc.pid")
    first = start(steady, workers=1, pidfile=pidfile)
    first.notify.wait_for("READY=1")
    with pytest.raises(ServiceRunningError) as refused:
        Service(steady, 1, pidfile=pidfile).run()
    assert refused.value.pid == first.pid
    assert str(refused.value) == (f"pidfile {pidfile} is held by a running service (pid "
                                  f"{first.pid}); stop it first or choose another pidfile")
    second = start(steady, workers=1, pidfile=pidfile)  # refused in its own process too
    assert second.wait() == EXIT_ALREADY_RUNNING
    below = descendants(first.pid)
    first.kill(signal.SIGKILL)
    first.wait()
    wait_gone(below)
    before = snapshot()
    assert Path(pidfile).read_text() == f"{first.pid}\n"  # stale: nobody holds its lock
    third = start(steady, workers=1, pidfile=pidfile)
    third.notify.wait_for("READY=1")
    assert Path(pidfile).read_text() == f"{third.pid}\n"
    assert (f"took over pidfile {pidfile}: pid {first.pid}, written in it, no longer holds "
            "its lock\n") in third.log()
    # The dead service's status table went with the takeover.
    assert f"ipcfork.service.{first.pid}" in before.dev_shm
    assert f"ipcfork.service.{first.pid}" not in snapshot().dev_shm
    third.kill(signal.SIGTERM)
    assert third.wait() == 0
    assert not Path(pidfile).exists()


def test_a_pidfile_others_can_write_is_refused(tmp_path: Path) -> None:
    pidfile = tmp_path / "open.pid"
    pidfile.write_text("")
    pidfile.chmod(0o666)
    with pytest.raises(UnsafeObjectError, match=r"is writable by others \(mode 666\)"):
        Service(steady, 1, pidfile=pidfile).run()
    assert pidfile.read_text() == ""


def test_a_pidfile_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"pidfile .*x\.pid: directory .* does not "
                       "exist"):
        Service(steady, 1, pidfile=tmp_path / "nowhere" / "x.pid")


def test_status_prints_each_worker_as_the_docs_say(start: Start, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pidfile = str(tmp_path / "svc.pid")
    service = start(steady, workers=2, pidfile=pidfile, name="mailer")
    service.notify.wait_for("READY=1")
    assert main(["status", pidfile]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"service mailer \(pid {service.pid}\): running, generation 1, 2 "
                        r"workers wanted, up [0-9.]+s, 0 restarts", lines[0])
    assert lines[1].split() == ["slot", "pid", "gen", "uptime", "units", "heartbeat", "rss",
                                "restarts", "state"]
    assert len(lines) == 4
    for slot, line in enumerate(lines[2:]):
        fields = line.split()
        assert fields[0] == str(slot) and fields[2] == "1" and fields[-1] == "running"
        assert fields[6] == "ago" and re.fullmatch(r"[0-9.]+[KMG]", fields[7])
    assert main(["status", pidfile, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["running"] is True and data["name"] == "mailer" and data["pid"] == service.pid
    assert set(data) == {"running", "pidfile", "name", "pid", "state", "generation",
                         "workers_wanted", "uptime", "restarts", "workers"}
    assert {tuple(sorted(worker)) for worker in data["workers"]} == {(
        "generation", "heartbeat_age", "pid", "restarts", "rss", "slot", "state", "units",
        "uptime")}
    assert all(worker["rss"] > 0 for worker in data["workers"])
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert main(["status", pidfile]) == 3
    assert capsys.readouterr().out == f"not running (no pidfile): {pidfile}\n"


def test_status_of_a_stale_pidfile_says_so(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text("999999999\n")
    assert main(["status", str(pidfile)]) == 3
    assert capsys.readouterr().out == (f"not running (stale pidfile: pid 999999999 does not "
                                       f"hold it): {pidfile}\n")
    assert main(["status", str(pidfile), "--json"]) == 3
    assert json.loads(capsys.readouterr().out) == {
        "running": False, "pidfile": str(pidfile),
        "reason": "stale pidfile: pid 999999999 does not hold it"}


_SERVE_MODULE = """
import time

def work(ctx):
    while not ctx.stopping:
        time.sleep(0.02)
        ctx.heartbeat()

def broken(ctx):
    raise SystemExit(5)
"""


def test_serve_command_runs_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "served.py").write_text(_SERVE_MODULE)
    pidfile = tmp_path / "served.pid"
    process = subprocess.Popen(
        [sys.executable, "-m", "ipcfork.cli", "serve", "served:work", "--workers", "2",
         "--pidfile", str(pidfile), "--drain-timeout", "5"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # the log tells when it is ready
        lines.append(line)
        if "ready: 2 workers, generation 1" in line:
            break
    else:
        raise AssertionError("".join(lines))
    assert pidfile.read_text() == f"{process.pid}\n"
    process.send_signal(signal.SIGTERM)
    with process:  # closes the pipe
        rest = process.stderr.read()
    assert process.wait(30) == 0
    assert "graceful stop: 2 workers to end within 5.0 s" in rest
    assert "service served:work stopped" in rest
    assert not pidfile.exists()


def test_serve_command_reports_a_crash_loop(tmp_path: Path) -> None:
    (tmp_path / "served.py").write_text(_SERVE_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "ipcfork.cli", "serve", "served:broken", "--workers", "1",
         "--max-restarts", "2", "--restart-window", "30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert result.returncode == 1
    assert ("ipcfork serve: crash loop: 3 worker exits within 30 s (max_restarts=2)"
            in result.stderr), result.stderr
    assert "exited with status 5" in result.stderr


@pytest.mark.timeout(120)
def test_chaos_kills_reloads_and_scaling_never_wedge_and_nothing_survives(
        start: Start, tmp_path: Path) -> None:
    """Random worker deaths (SIGKILL, SIGSEGV, SIGTERM), reloads and scaling, at random
    moments, then a stop: the supervisor answers every time and leaves nothing behind."""
    import random

    out = tmp_path / "pids"
    rng = random.Random(20261201)
    service = start(spawner(out), workers=3, max_restarts=10_000, drain_timeout=2.0)
    service.notify.wait_for("READY=1")
    seen: set[int] = set()
    for _ in range(60):
        action = rng.choice(["kill", "kill", "kill", "hup", "ttin", "ttou"])
        if action == "kill":
            rows = service.running()
            if rows:
                victim = rng.choice(rows)["pid"]
                seen.add(victim)
                # A row may outlive its worker for a moment (reaped, row not yet freed).
                with contextlib.suppress(ProcessLookupError):
                    pidfd = os.pidfd_open(victim)
                    try:
                        signal.pidfd_send_signal(
                            pidfd, rng.choice([signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM]))
                    finally:
                        os.close(pidfd)
        else:
            service.kill({"hup": signal.SIGHUP, "ttin": signal.SIGTTIN,
                          "ttou": signal.SIGTTOU}[action])
        seen.update(descendants(service.pid))
        service.notify.drain()  # as systemd would: read what the supervisor says
        time.sleep(rng.uniform(0, 0.05))  # a random moment, not a synchronisation
    # Still answering: a scaling request is acknowledged with a STATUS line.
    service.notify.drain()
    service.kill(signal.SIGTTIN)
    service.notify.wait_for("STATUS=")
    seen.update(descendants(service.pid))
    service.kill(signal.SIGTERM)
    assert service.wait(timeout=60) == 0
    if out.exists():
        seen.update(int(pid) for line in out.read_text().splitlines() for pid in line.split())
    assert wait_gone(sorted(seen), timeout=5.0) == []
    assert "Traceback" not in service.log().replace("raised\nTraceback", "")


def test_the_guides_first_example_prints_what_the_guide_says(tmp_path: Path) -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    code = re.findall(r"```python\n(.*?)```", guide, flags=re.S)[0]
    claimed = re.findall(r"It prints[^\n]*\n\n```text\n(.*?)```", guide, flags=re.S)[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=50, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    expected = claimed.splitlines()
    assert sorted(printed[:-1]) == expected[:-1]  # the workers, in either order
    assert printed[-1] == expected[-1]


def _race_for(path: Path, contenders: int) -> list[int]:
    """``contenders`` processes try to take the pidfile at once and hold it until all have
    tried; returns each one's verdict (0: took it, 1: refused)."""
    from ipcfork.service.pidfile import Pidfile

    verdicts_r, verdicts_w = os.pipe()
    release_r, release_w = os.pipe()
    pids = []
    for _ in range(contenders):
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.close(verdicts_r)
                os.close(release_w)
                pidfile = Pidfile(path)
                try:
                    pidfile.acquire()
                    verdict = 0
                except ServiceRunningError:
                    verdict = 1
                os.write(verdicts_w, str(verdict).encode())
                os.read(release_r, 1)  # hold it until every contender has tried
                if verdict == 0:
                    pidfile.release()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(verdicts_w)
    os.close(release_r)
    verdicts = []
    with os.fdopen(verdicts_r, "rb") as results:
        while len(verdicts) < contenders:
            byte = results.read(1)
            assert byte, "a contender died without a verdict"
            verdicts.append(int(byte))
    os.close(release_w)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return verdicts


@pytest.mark.timeout(120)
def test_racing_for_a_stale_pidfile_has_exactly_one_winner(tmp_path: Path) -> None:
    for trial in range(150):
        path = tmp_path / f"race{trial}.pid"
        path.write_text("999999999\n")  # stale: written by a dead service, lock free
        path.chmod(0o600)
        verdicts = _race_for(path, 6)
        assert sorted(verdicts) == [0, 1, 1, 1, 1, 1], (trial, verdicts)
        assert not path.exists()  # the winner removed it


def test_a_takeover_spares_the_status_table_of_a_live_pid(start: Start, tmp_path: Path) -> None:
    other = start(steady, workers=1)  # a live service that does not use the pidfile
    other.notify.wait_for("READY=1")
    pidfile = tmp_path / "reused.pid"
    pidfile.write_text(f"{other.pid}\n")  # stale, but its pid is alive (as after reuse)
    pidfile.chmod(0o600)
    taker = start(steady, workers=1, pidfile=str(pidfile))
    taker.notify.wait_for("READY=1")
    assert (f"pid {other.pid}, written in it, no longer holds its lock (that pid now belongs "
            "to another process)") in taker.log()
    assert other.summary()["pid"] == other.pid  # its table is still there
    for service in (taker, other):
        service.kill(signal.SIGTERM)
        assert service.wait() == 0


@pytest.mark.timeout(120)
def test_signals_during_setup_never_leave_a_pidfile_or_a_table(start: Start,
                                                               tmp_path: Path) -> None:
    """SIGHUP, SIGUSR1 and SIGTTIN at random moments of a starting service, then SIGTERM:
    whenever the service got as far as its pidfile, it stops and removes everything."""
    import random

    rng = random.Random(7)
    for trial in range(25):
        pidfile = tmp_path / f"setup{trial}.pid"
        service = start(steady, workers=1, pidfile=str(pidfile))
        time.sleep(rng.uniform(0, 0.03))  # a random moment of the start, not a synchronisation
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN):
            os.kill(service.pid, signum)
        # Dead before run() began (HUP's default action), or stopped by TERM: never a
        # SIGKILL, which could land just after a pidfile appeared that we had not yet seen.
        os.kill(service.pid, signal.SIGTERM)
        service.wait()
        assert not pidfile.exists(), (trial, service.log())
        assert f"ipcfork.service.{service.pid}" not in snapshot().dev_shm, trial


def test_signals_during_the_teardown_are_dropped_and_everything_is_removed(
        start: Start, tmp_path: Path) -> None:
    out = tmp_path / "stubborn"
    termed_r, termed_w = os.pipe()  # the grandchild writes to it when the sweep TERMs it
    stubborn_code = ("import os, signal, sys, time\n"
                     "fd = int(sys.argv[1])\n"
                     "signal.signal(signal.SIGTERM, lambda *_: os.write(fd, b'T'))\n"
                     "print(flush=True)\n"
                     "while True: time.sleep(3600)\n")

    def leaves_a_stubborn_grandchild(ctx: WorkerContext) -> None:
        child = subprocess.Popen([sys.executable, "-c", stubborn_code, str(termed_w)],
                                 stdout=subprocess.PIPE, pass_fds=(termed_w,))
        assert child.stdout is not None
        child.stdout.readline()  # its TERM handler is in place from here on
        out.write_text(str(child.pid))
        steady(ctx)

    pidfile = tmp_path / "teardown.pid"
    service = start(leaves_a_stubborn_grandchild, workers=1, pidfile=str(pidfile))
    service.notify.wait_for("READY=1")
    deadline = time.monotonic() + 20
    while not out.exists():  # the worker reports its grandchild (file polling, bounded)
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.01)
    stubborn = int(out.read_text())
    os.close(termed_w)
    service.kill(signal.SIGTERM)
    # The worker ends at once; the grandchild survives the sweep's TERM (and says so), so
    # the sweep waits its grace (1 s): the signals sent now land in the teardown.
    ready, _, _ = select.select([termed_r], [], [], 20)
    assert ready and os.read(termed_r, 1) == b"T", service.log()
    os.close(termed_r)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN):
        service.kill(signum)
    assert service.wait() == 0, service.log()
    assert not pidfile.exists()
    assert f"ipcfork.service.{service.pid}" not in snapshot().dev_shm
    assert wait_gone([stubborn], timeout=1.0) == []
