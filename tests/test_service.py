"""The supervised service: readiness, graceful and fast stops, worker replacement with
backoff, heartbeat kills, reloads, scaling, the crash-loop stop, the watchdog and the
status table, each with real forks, real signals and a real notify socket."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from service_kit import EXIT_CRASH_LOOP, RunningService, Start, steady

from ipcfork import InvalidArgumentError, Service, WorkerContext
from ipcfork.service.notify import monotonic_usec


def stubborn(ctx: WorkerContext) -> None:
    """A worker that never looks at ``stopping`` (and never returns on its own)."""
    while True:
        time.sleep(0.02)
        ctx.heartbeat()


def test_ready_then_graceful_stop_leaves_nothing(start: Start, tmp_path: Path) -> None:
    service = start(steady, workers=3, pidfile=str(tmp_path / "svc.pid"))
    _, ready = service.notify.wait_for("READY=1")
    assert "STATUS=3 of 3 workers running, generation 1" in ready
    rows = service.running()
    assert sorted(row["slot"] for row in rows) == [0, 1, 2]
    assert all(row["generation"] == 1 for row in rows)
    assert Path(tmp_path / "svc.pid").read_text() == f"{service.pid}\n"
    service.kill(signal.SIGTERM)
    service.notify.wait_for("STOPPING=1")
    assert service.wait() == 0
    assert not (tmp_path / "svc.pid").exists()
    log = service.log()
    assert log.count("exited with status 0") == 3, log
    assert "service steady stopped" in log


def test_killed_worker_is_replaced_after_the_first_backoff(start: Start) -> None:
    service = start(steady, workers=2)
    service.notify.wait_for("READY=1")
    victim = service.running()[0]
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    service.notify.wait_for("STATUS=1 of 2 workers running")
    replaced_at, _ = service.notify.wait_for("STATUS=2 of 2 workers running")
    assert replaced_at - killed_at >= 0.1  # the first backoff is 0.1 s
    rows = {row["slot"]: row for row in service.running()}
    assert rows[victim["slot"]]["pid"] != victim["pid"]
    assert rows[victim["slot"]]["restarts"] == 1
    assert service.summary()["restarts"] == 1
    assert (f"worker {victim['slot']} (pid {victim['pid']}) killed by SIGKILL; replacing it "
            "in 0.1 s") in service.log()
    service.kill(signal.SIGTERM)
    assert service.wait() == 0


def test_backoff_doubles_for_a_slot_that_keeps_dying(start: Start) -> None:
    def dies_at_once(ctx: WorkerContext) -> None:
        raise RuntimeError("broken at start")

    service = start(dies_at_once, workers=1, max_restarts=100)
    for _ in range(4):
        service.notify.wait_for("STATUS=0 of 1 workers running")
        service.notify.wait_for("STATUS=1 of 1 workers running")
    log = service.log()
    delays = re.findall(r"exited with status 1; replacing it in ([0-9.]+) s", log)
    assert delays[:4] == ["0.1", "0.2", "0.4", "0.8"], log
    assert "RuntimeError: broken at start" in log  # the worker's traceback is logged
    service.kill(signal.SIGTERM)
    assert service.wait() == 0


def test_quick_deaths_in_a_row_stop_a_one_worker_service(start: Start) -> None:
    """With one worker the backoff spaces exits apart (0.1 s, 0.2 s, ...), so a window of
    0.05 s never holds two of them; the deaths in a row still make a crash loop."""
    def exits(ctx: WorkerContext) -> None:
        os._exit(9)

    service = start(exits, workers=1, max_restarts=2, restart_window=0.05)
    assert service.wait() == EXIT_CRASH_LOOP
    assert ("CrashLoopError: crash loop: worker 0 died 3 times in a row, each within 10 s of "
            "its start (max_restarts=2); the last: worker 0") in service.log()


def test_crash_loop_stops_the_service_and_says_why(start: Start) -> None:
    def exits(ctx: WorkerContext) -> None:
        os._exit(7)

    began = time.monotonic()
    service = start(exits, workers=1, max_restarts=3, restart_window=60.0)
    assert service.wait() == EXIT_CRASH_LOOP
    # Backoffs of 0.1 + 0.2 + 0.4 s come before the fourth exit.
    assert time.monotonic() - began >= 0.7
    log = service.log()
    assert ("CrashLoopError: crash loop: 4 worker exits within 60 s (max_restarts=3); the "
            "last: worker 0") in log, log
    assert "exited with status 7" in log


def test_silent_worker_is_terminated_and_replaced(start: Start, tmp_path: Path) -> None:
    marker = tmp_path / "hung-once"

    def hangs_once(ctx: WorkerContext) -> None:
        if ctx.index == 0 and not marker.exists():
            marker.write_text(str(os.getpid()))
            while True:  # stuck: no heartbeat, ignores TERM (only KILL ends it)
                time.sleep(3600)
        steady(ctx)

    # 2 s: the healthy worker (a beat every 20 ms) is never that late, even on a loaded host.
    service = start(hangs_once, workers=2, heartbeat_timeout=2.0, drain_timeout=0.3)
    started, _ = service.notify.wait_for("READY=1")
    service.notify.wait_for("STATUS=1 of 2 workers running")
    noticed = time.monotonic()
    service.notify.wait_for("STATUS=2 of 2 workers running")
    assert noticed - started >= 2.0  # not before the heartbeat_timeout
    hung = int(marker.read_text())
    log = service.log()
    assert re.search(rf"worker 0 \(pid {hung}\) was silent for [0-9.]+ s "
                     r"\(heartbeat_timeout=2 s\) and was terminated", log), log
    assert f"worker 0 (pid {hung}) did not end in time: SIGKILL" in log
    assert hung not in [row["pid"] for row in service.running()]
    service.kill(signal.SIGTERM)
    assert service.wait() == 0


def test_reload_starts_a_new_generation_then_drains_the_old(start: Start) -> None:
    service = start(steady, workers=2)
    service.notify.wait_for("READY=1")
    old = {row["pid"] for row in service.running()}
    service.kill(signal.SIGHUP)
    _, reloading = service.notify.wait_for("RELOADING=1")
    stamp = int(re.search(r"MONOTONIC_USEC=(\d+)", reloading).group(1))  # type: ignore[union-attr]
    assert 0 < stamp <= monotonic_usec()
    _, ready = service.notify.wait_for("READY=1")
    assert "generation 2" in ready
    rows = service.running()
    assert {row["generation"] for row in rows} == {2}
    assert not old & {row["pid"] for row in rows}
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    log = service.log()
    for pid in old:  # the old generation saw ``stopping`` and returned
        assert re.search(rf"pid {pid}, generation 1\) ended: exited with status 0", log), log


def test_reload_of_a_module_runs_the_new_code(start: Start, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "reloadable_work.py"
    module.write_text("VERSION = 1\n" + _MODULE_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    service = start("reloadable_work:work", workers=1, environ={"OUT": str(tmp_path / "out")})
    service.notify.wait_for("READY=1")
    module.write_text("VERSION = 2  # a new size: no stale bytecode\n" + _MODULE_BODY)
    service.kill(signal.SIGHUP)
    service.notify.wait_for("READY=1")
    module.write_text("VERSION = (\n")  # a syntax error: the reload is refused
    service.kill(signal.SIGHUP)
    service.notify.wait_for("STATUS=reload refused, generation 2 keeps running: SyntaxError")
    service.kill(signal.SIGTERM)
    assert service.wait() == 0, service.log()
    # Each generation's worker wrote its module's VERSION (in either order: READY says the
    # workers were forked, not that they ran).
    assert sorted((tmp_path / "out").read_text().split()) == ["1", "2"], service.log()


_MODULE_BODY = """
import os

def work(ctx):
    with open(os.environ["OUT"], "a") as out:
        out.write(f"{VERSION}\\n")
    while not ctx.stopping:
        ctx.heartbeat()
        import time; time.sleep(0.02)
"""


def test_ttin_and_ttou_scale_by_one_never_below_one(start: Start) -> None:
    service = start(steady, workers=2)
    service.notify.wait_for("READY=1")
    service.kill(signal.SIGTTIN)
    service.notify.wait_for("STATUS=3 of 3 workers running")
    for wanted in (2, 1):
        service.kill(signal.SIGTTOU)
        service.notify.wait_for(f"STATUS={wanted} of {wanted} workers running")
    service.kill(signal.SIGTTOU)  # already 1: stays 1
    service.notify.wait_for("STATUS=1 of 1 workers running")
    # Python runs pending handlers by signal number, not by arrival: USR1 (10) before
    # TERM (15), so the table is logged before the stop.
    service.kill(signal.SIGUSR1)
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    log = service.log()
    assert "workers stay at 1 (the limits are 1 and 512)" in log
    assert re.search(r"service steady \(pid \d+\): running, generation 1, 1 workers wanted", log)


def test_drain_timeout_kills_a_worker_that_does_not_stop(start: Start) -> None:
    service = start(stubborn, workers=1, drain_timeout=0.3)
    service.notify.wait_for("READY=1")
    began = time.monotonic()
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert time.monotonic() - began >= 0.3
    assert "did not end in time: SIGKILL" in service.log()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_sigint_and_sigquit_stop_fast_even_with_a_long_drain_timeout(start: Start,
                                                                     signum: int) -> None:
    service = start(stubborn, workers=2, drain_timeout=60.0)
    service.notify.wait_for("READY=1")
    began = time.monotonic()
    service.kill(signum)
    assert service.wait() == 0
    assert time.monotonic() - began < 10.0  # about a second; never the 60 s drain
    assert "fast stop: 2 workers to end within 0.5 s" in service.log()


def test_watchdog_pings_at_half_the_interval(start: Start) -> None:
    service = start(steady, workers=1, environ={"WATCHDOG_USEC": "200000"})
    first, _ = service.notify.wait_for("WATCHDOG=1")
    for _ in range(3):
        service.notify.wait_for("WATCHDOG=1")
    assert time.monotonic() - first >= 0.2  # three more pings, 0.1 s apart at least
    service.kill(signal.SIGTERM)
    assert service.wait() == 0


def test_a_watchdog_meant_for_another_pid_is_ignored(start: Start) -> None:
    service = start(steady, workers=1, environ={"WATCHDOG_USEC": "200000",
                                                 "WATCHDOG_PID": "1"})
    service.notify.wait_for("READY=1")
    service.kill(signal.SIGTERM)
    service.notify.wait_for("STOPPING=1")
    assert service.wait() == 0
    assert not any("WATCHDOG=1" in text for text in service.notify.drain())


@pytest.mark.parametrize(("options", "message"), [
    ({"work": 3}, "work must be a callable or 'module:function', not 3"),
    ({"workers": 0}, "workers must be an int from 1 to 512, not 0"),
    ({"workers": 513}, "workers must be an int from 1 to 512, not 513"),
    ({"heartbeat_timeout": -1}, "heartbeat_timeout must be a finite number of seconds > 0"),
    ({"drain_timeout": float("nan")}, "drain_timeout must be a finite number of seconds >= 0"),
    ({"max_restarts": 0}, "max_restarts must be an int from 1 to 1000000, not 0"),
    ({"name": "x" * 65}, "name must be a non-empty str of at most 64 bytes"),
    ({"work": "no_such_module_here:work"}, "cannot load no_such_module_here:work: "
                                            "ModuleNotFoundError"),
    ({"work": "os:no_such_function"}, "cannot load os:no_such_function: AttributeError"),
    ({"work": "os"}, "'os' is not MODULE:FUNCTION"),
])
def test_bad_options_are_refused_with_the_limit(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"work": steady, **options}
    with pytest.raises(InvalidArgumentError) as caught:
        Service(arguments.pop("work"), **arguments)
    assert message in str(caught.value)


def test_run_off_the_main_thread_is_refused() -> None:
    import threading

    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            Service(steady, 1).run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])


def _until(condition: Callable[[], bool], what: str, service: RunningService) -> None:
    """Poll the status table (shared memory) until ``condition`` holds: 20 s at most."""
    from ipcfork import ObjectNotFoundError

    def holds() -> bool:
        try:
            return condition()
        except ObjectNotFoundError:  # the supervisor has not made its status table yet
            return False

    deadline = time.monotonic() + 20
    while not holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within 20 s:\n{service.log()}")
        time.sleep(0.005)


def test_a_listener_that_stops_reading_never_blocks_the_supervisor(start: Start) -> None:
    import socket

    service = start(steady, workers=2)
    service.notify.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the minimum
    _until(lambda: len(service.running()) == 2, "two workers", service)
    for generation in range(2, 12):  # each reload says RELOADING=1, then READY=1
        service.kill(signal.SIGHUP)
        _until(lambda wanted=generation: {r["generation"] for r in service.running()} ==  # type: ignore[misc]
               {wanted} and len(service.running()) == 2, f"generation {generation}", service)
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    log = service.log()
    # Whether a datagram was refused depends on the host's net.unix.max_dgram_qlen (10 by
    # default): with room for all, none is; either way a refusal is logged once at most.
    assert log.count("cannot notify") <= 1, log


def test_an_idle_worker_waiting_in_ctx_wait_stops_at_once(start: Start, tmp_path: Path) -> None:
    out = tmp_path / "waits"

    def idle(ctx: WorkerContext) -> None:
        began = time.monotonic()
        timed_out = ctx.wait(0.2)  # nothing to do: the whole timeout passes
        with open(out, "a") as file:
            file.write(f"{timed_out} {time.monotonic() - began:.3f}\n")
        ctx.heartbeat()
        while not ctx.wait(3600):  # idle for an hour, unless stopped
            pass
        with open(out, "a") as file:
            file.write("stopped\n")

    service = start(idle, workers=2)
    service.notify.wait_for("READY=1")
    _until(lambda: all(row["units"] == 1 for row in service.running()), "first units", service)
    # Both workers are inside ctx.wait(3600) now: their first unit is counted.
    began = time.monotonic()
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert time.monotonic() - began < 10  # not the hour
    lines = out.read_text().splitlines()
    assert sorted(lines)[-2:] == ["stopped", "stopped"]
    for line in lines[:2]:
        flag, seconds = line.split()
        assert flag == "False" and 0.2 <= float(seconds) < 10


def test_ctx_wait_refuses_a_negative_timeout(start: Start, tmp_path: Path) -> None:
    out = tmp_path / "error"

    def bad_wait(ctx: WorkerContext) -> None:
        try:
            ctx.wait(-1)
        except InvalidArgumentError as exc:
            out.write_text(str(exc))
        while not ctx.wait(3600):
            pass

    service = start(bad_wait, workers=1)
    service.notify.wait_for("READY=1")
    _until(out.exists, "the error", service)
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert out.read_text() == "timeout must be >= 0, not -1"


def test_a_full_status_table_refuses_a_reload_and_delays_a_scale_up(
        start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipcfork.service import status

    monkeypatch.setattr(status, "CAPACITY", 4)  # room for 4 workers, inherited by the fork
    service = start(steady, workers=3)
    service.notify.wait_for("READY=1")
    service.kill(signal.SIGHUP)  # 3 new workers would need 3 free rows; there is 1
    service.notify.wait_for("STATUS=reload refused, generation 1 keeps running: the status "
                            "table has room for 1 more workers, a new generation needs 3")
    service.kill(signal.SIGTTIN)
    service.notify.wait_for("STATUS=4 of 4 workers running")
    service.kill(signal.SIGTTIN)  # a fifth: no row for it
    service.notify.wait_for("STATUS=4 of 5 workers running")
    service.kill(signal.SIGTERM)
    assert service.wait() == 0
    assert "no room in the status table for worker 4; trying again in 0.1 s" in service.log()
