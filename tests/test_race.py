"""The race laboratory (``ipcfork race``): real forks, real shared objects.

The Python API is tested directly (fast); the command runs as ``python -m ipcfork race`` in
a subprocess for its JSON, exit statuses, argument errors and Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ipcfork import InvalidArgumentError, race
from ipcfork.race import report
from ipcfork.race.command import parse_kill_every, parse_window

LOCKS = [name for name, spec in race.GUARDS.items()
         if spec.kind == "lock" and not spec.broken and not spec.cluster]
WINDOW = 50e-6  # with it, every unguarded worker rereads a stale value: losses are certain


def _run(*args: object, **kwargs: object) -> race.RunResult:
    """``race.run`` that skips when the guard is not in this version of ipcfork."""
    scenario, guard = str(args[0]), str(args[1])
    why = race.skip_reason(scenario, guard)
    if why is not None:
        pytest.skip(why)
    return race.run(*args, **kwargs)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipcfork", "race", *args],
                          capture_output=True, text=True, timeout=60)


# -- the Python API ---------------------------------------------------------------------


@pytest.mark.parametrize("guard", [g for g in race.DEFAULT_GUARDS if g != "none"])
def test_every_guard_counts_exactly_across_four_processes(guard: str) -> None:
    result = _run("counter", guard, 4, 3000, seed=1)
    assert (result.expected, result.observed, result.lost) == (12_000, 12_000, 0)
    assert result.exact and result.guarded and not result.failed
    assert result.workers == 4 and result.ops_per_s > 0 and result.max_worker_rss_kib > 0


def test_unguarded_counter_loses_updates_with_a_window() -> None:
    result = race.run("counter", "none", 4, 200, WINDOW)
    assert 0 < result.lost < 800 and result.observed == 800 - result.lost
    assert result.lost_pct == pytest.approx(100 * result.lost / 800)
    assert not result.exact and not result.guarded and not result.failed


@pytest.mark.parametrize("guard", race.DEFAULT_GUARDS)
def test_transfer_keeps_the_total(guard: str) -> None:
    window = WINDOW if guard == "none" else 0.0
    result = _run("transfer", guard, 4, 300 if guard == "none" else 1500, window, 7)
    if guard == "none":  # the versions count what was lost, whatever the sum did
        assert result.lost > 0 and not result.exact
        return
    assert result.observed == result.expected == 8 * 1_000_000
    assert result.lost == 0 and result.exact


@pytest.mark.parametrize("guard", LOCKS)
def test_guarded_buffer_loses_and_duplicates_nothing(guard: str) -> None:
    result = race.run("buffer", guard, 4, 1000)
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.observed == result.expected == 4000 and result.exact


def test_unguarded_buffer_loses_and_duplicates_alike() -> None:
    result = race.run("buffer", "none", 4, 200, WINDOW)
    # The semaphores keep deliveries equal to productions: each loss is one duplicate.
    assert result.lost == result.duplicated > 0


@pytest.mark.parametrize("guard", LOCKS)
def test_deadlock_ends_within_its_timeout_and_reports_it(guard: str) -> None:
    began = time.monotonic()
    result = race.run("deadlock", guard, 2, lock_timeout=0.2)
    assert time.monotonic() - began < 10
    assert result.workers == 2 and 1 <= result.deadlocked <= 2
    assert result.observed == 2 - result.deadlocked
    assert result.note is not None and "deadlock" in result.note
    assert not result.failed  # deadlocking is what the scenario shows


def test_deadlock_forms_a_ring_with_more_workers() -> None:
    result = race.run("deadlock", "mutex-posix", 3, lock_timeout=0.2)
    assert result.workers == 3 and result.deadlocked >= 1


def test_flock_on_an_inherited_descriptor_guards_nothing() -> None:
    result = race.run("counter", "flock-inherited", 4, 200, WINDOW)
    assert result.lost > 0 and result.guarded and result.failed


def test_guards_that_do_not_apply_are_skipped_in_sweeps() -> None:
    assert race.skip_reason("buffer", "counter") is not None
    assert race.skip_reason("deadlock", "none") is not None
    assert race.skip_reason("counter", "none") is None
    with pytest.raises(InvalidArgumentError, match="does not apply"):
        race.run("deadlock", "none")
    results = list(race.sweep(["deadlock"], ["none"], [2]))
    assert len(results) == 1 and results[0].skipped


def test_bad_arguments_name_the_limit() -> None:
    with pytest.raises(InvalidArgumentError, match=r"1\.\.64"):
        race.run(workers=0)
    with pytest.raises(InvalidArgumentError, match=r"0\.\.1\.0 s"):
        race.run(window=2.0)
    with pytest.raises(InvalidArgumentError, match="choose from"):
        race.run("nope")
    with pytest.raises(InvalidArgumentError, match="choose from"):
        race.run(guard="nope")


def test_windows_parse_with_units() -> None:
    assert parse_window("50us") == pytest.approx(50e-6)
    assert parse_window("50µs") == pytest.approx(50e-6)
    assert parse_window("0.5ms") == pytest.approx(0.5e-3)
    assert parse_window("2e-5") == pytest.approx(2e-5)
    with pytest.raises(Exception, match="5us"):  # a bare 5 is seconds: too long
        parse_window("5")


def test_report_says_plainly_when_the_race_did_not_show() -> None:
    quiet = race.RunResult("counter", "none", 4, 10, 0.0, 1, expected=40, observed=40,
                           updates=40, exact=True)
    text = report.format_report([quiet], report.Usage(1.0, 1024, 2048))
    assert "lost nothing" in text and "--window" in text
    assert "wall time 1.0 s" in text and "peak memory" in text
    alone = race.RunResult("counter", "none", 1, 10, 0.0, 1, expected=10, observed=10,
                           updates=10, exact=True)
    assert not any("--window" in line for line in report.notes([alone]))


# -- the command ------------------------------------------------------------------------


def test_cli_prints_tables_and_exits_0_when_guards_hold() -> None:
    done = _cli("-k", "2000")
    assert done.returncode == 0, done.stderr
    assert "counter: 4 workers x 2,000 iterations" in done.stdout
    for guard in race.DEFAULT_GUARDS:
        assert guard in done.stdout
    assert "Every guarded run was exact." in done.stdout
    assert "wall time" in done.stdout and "peak memory" in done.stdout
    assert done.stderr == ""  # no progress display off a terminal


def test_cli_json_is_valid_and_alone_on_stdout() -> None:
    done = _cli("--json", "-k", "1000", "--guard", "none", "--guard", "mutex-posix",
                "--workers", "1,2", "--scenario", "counter,deadlock", "--lock-timeout", "0.1")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["exit_status"] == 0 and doc["config"]["workers"] == [1, 2]
    runs = doc["runs"]
    assert [(r["scenario"], r["guard"], r["workers"]) for r in runs] == [
        ("counter", "none", 1), ("counter", "mutex-posix", 1),
        ("counter", "none", 2), ("counter", "mutex-posix", 2),
        ("deadlock", "none", 2), ("deadlock", "mutex-posix", 2),
        ("deadlock", "none", 2), ("deadlock", "mutex-posix", 2)]
    assert runs[1]["exact"] and runs[1]["observed"] == 1000
    assert runs[4]["skipped"] and runs[5]["deadlocked"] >= 1
    assert doc["peak_rss_kib"]["self"] > 0 and doc["wall_time_s"] > 0


def test_cli_exits_1_when_a_guarded_run_loses_an_update() -> None:
    done = _cli("--json", "--guard", "flock-inherited", "--guard", "mutex-sysv",
                "--window", "50us", "-k", "200")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    failed = [r["guard"] for r in doc["runs"] if r["failed"]]
    assert failed == ["flock-inherited"] and doc["exit_status"] == 1
    assert any(note.startswith("FAILED") for note in doc["notes"])


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "workers must be in 1..64"),
    (["--workers", "2,x"], "workers must be an integer"),
    (["--window", "5"], "window must be at most 1 s, not 5 s; for microseconds write 5us"),
    (["-k", "0"], "iterations must be in 1..10000000"),
    (["--guard", "nope"], "invalid choice"),
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--scenario", "crash", "--kill-every", "4ms..1ms"], "kill intervals must satisfy"),
    (["--scenario", "crash", "--kill-every", "1us"], "kill intervals must satisfy"),
    (["--scenario", "crash", "--stall", "0"], "stall must be in (0, 60] s"),
    (["--scenario", "crash", "--duration", "2h"], "is not a duration"),
])
def test_cli_rejects_bad_arguments_naming_the_limit(args: list[str], message: str) -> None:
    done = _cli(*args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_cli_plot_needs_matplotlib_and_says_so() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
            "from ipcfork.cli import main; sys.exit(main(['race', '--plot', 'x.png']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "pip install 'ipcfork[plot]'" in done.stderr


def test_cli_plot_draws_a_png(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("matplotlib")
    path = os.path.join(os.fspath(tmp_path), "race.png")
    done = _cli("--plot", path, "-k", "500", "--guard", "none", "--guard", "semaphore",
                "--workers", "1,2")
    assert done.returncode == 0, done.stderr
    with open(path, "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def _children_of(pid: int) -> list[int]:
    """Every child of ``pid`` (forks happen in a pool's manager thread, so ask each task)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as source:
            kids += [int(k) for k in source.read().split()]
    return kids


def _read_until(fd: int, pattern: bytes, timeout: float = 30) -> bytes:
    seen = b""
    while not re.search(pattern, seen):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {pattern!r} within {timeout} s; saw {seen[-200:]!r}"
        seen += os.read(fd, 4096)
    return seen


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_run_exits_and_leaves_nothing(signum: int, status: int) -> None:
    # stderr on a terminal, as for a person pressing Ctrl-C: the live progress shows when
    # the workers are under way, so no sleep is needed to know the run is in progress.
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ipcfork", "race", "--guard", "none",
                             "--guard", "mutex-sysv", "--window", "200us", "-k", "200000"],
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    try:
        _read_until(master, rb"\b[1-9]\d*%")  # the first run has done some work
        workers = _children_of(proc.pid)
        assert len(workers) == 4
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
        said = b""
        while True:  # the rest of what reached the terminal, up to its closing
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status and out == ""
    lines = [ln for ln in said.decode().replace("\r", "\n").split("\n") if ln.strip()]
    assert lines[-1] == "ipcfork race: interrupted; workers stopped, nothing left behind"
    for pid in workers:  # reaped by the command, not merely re-parented
        assert not os.path.exists(f"/proc/{pid}")
    # No IPC object left: the autouse fixture compares snapshots around this test.


def test_a_worker_killed_mid_run_ends_the_run_instead_of_hanging() -> None:
    """SIGKILL one worker while the others contend on a semaphore it may hold (not robust):
    the run must stop the others and report the crash, not wait for them forever."""
    from ipcfork import ChildCrashedError, testing

    killed: list[int] = []

    def progress(fraction: float) -> None:
        if not killed and fraction > 0:
            victim = testing.children()[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    with pytest.raises(ChildCrashedError):
        race.run("counter", "semaphore", workers=4, iterations=5_000_000, window=0.0,
                 progress=progress)
    assert killed


# -- the crash scenario: real forks, real SIGKILLs ---------------------------------------

ROOMY_STALL = 5.0  # a robust guard on a machine busy with other tests must not look wedged
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "races.md")


def _crash(guard: str, **kwargs: object) -> race.CrashResult:
    """``race.run_crash`` that skips when the guard is not in this version of ipcfork."""
    from ipcfork.race.crash import crash_skip_reason

    why = crash_skip_reason(guard)
    if why is not None:
        pytest.skip(why)
    return race.run_crash(guard, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("guard", ["mutex-sysv", "counter"])
def test_crash_a_robust_guard_survives_a_kill_storm(guard: str) -> None:
    result = _crash(guard, workers=3, duration=0.8, stall=ROOMY_STALL, seed=5)
    assert result.kills > 0 and result.spawned == result.kills + 3
    assert not result.wedged and result.wedged_after is None
    assert result.verdict == "never wedged"
    assert result.robust and result.exact and not result.failed
    # The counter holds every recorded increment, plus at most one in flight per kill.
    assert result.lost == 0 and 0 <= result.in_flight <= result.kills + 3
    assert result.observed == result.expected + result.in_flight > 0
    assert result.longest_stall < ROOMY_STALL
    if guard == "mutex-sysv":  # it tells the next holder; the lab saw where victims died
        assert result.owner_died is not None and result.kills_in_cs is not None
        assert 0 <= result.kills_in_cs <= result.kills
    else:  # one atomic add: no critical section, nobody to tell
        assert result.owner_died is None and result.kills_in_cs is None


@pytest.mark.parametrize("guard", ["posix-sem", "mp-lock"])
def test_crash_a_lock_without_owner_wedges_and_the_run_stops_at_once(guard: str) -> None:
    began = time.monotonic()
    result = _crash(guard, workers=2, duration=30.0, stall=0.3, seed=3)
    took = time.monotonic() - began
    assert result.wedged and not result.robust and not result.failed  # it is the lesson
    assert re.fullmatch(r"wedged after [\d,]+ kills?", result.verdict)
    assert result.wedged_after is not None and 1 <= result.wedged_after <= result.kills
    assert result.longest_stall >= 0.3 and result.owner_died is None
    assert took < 20  # the stall threshold ended it, long before its 30 s under fire
    assert result.exact and result.lost == 0
    # Every worker killed and reaped, the semaphore unlinked: the autouse fixture checks.


def test_crash_rejects_what_does_not_apply_naming_the_limit() -> None:
    with pytest.raises(InvalidArgumentError, match="does not apply"):
        race.run_crash("none")
    with pytest.raises(InvalidArgumentError, match=r"\(0, 600\] s"):
        race.run_crash("mutex-sysv", duration=0)
    with pytest.raises(InvalidArgumentError, match="low <= high"):
        race.run_crash("mutex-sysv", kill_every=(0.004, 0.001))
    results = list(race.crash_sweep(["none"], [2]))
    assert len(results) == 1 and results[0].skipped and results[0].verdict.startswith("skip")


def test_crash_report_says_who_cannot_tell_instead_of_zero() -> None:
    common = dict(scenario="crash", workers=4, iterations=0, window=0.0, seed=1,
                  guarded=True, duration=1.0, kill_every=(0.0005, 0.004),
                  stall_threshold=1.0, exact=True)
    rows = [race.CrashResult(guard="mutex-sysv", kills=300, kills_in_cs=10, owner_died=12,
                             longest_stall=0.04, robust=True, **common),  # type: ignore[arg-type]
            race.CrashResult(guard="mp-lock", kills=40, kills_in_cs=1, wedged=True,
                             wedged_after=7, longest_stall=1.0, **common),  # type: ignore[arg-type]
            race.CrashResult(guard="counter", kills=300, longest_stall=0.03, robust=True,
                             **common)]  # type: ignore[arg-type]
    text = report.format_report(rows, report.Usage(1.0, 1024, 2048))
    lines = text.splitlines()
    assert lines[1].split()[:9] == ["guard", "kills", "seen", "in", "CS", "owner", "died",
                                    "longest", "stall"]
    mp_lock = next(line for line in lines if line.startswith("mp-lock"))
    assert mp_lock.split()[2:4] == ["1", "—"] and mp_lock.endswith("wedged after 7 kills")
    counter = next(line for line in lines if line.startswith("counter"))
    assert counter.split()[2:4] == ["—", "—"] and counter.endswith("never wedged")
    assert "Wedged, as they must" in text and "mp-lock" in text
    assert report.exit_status(rows) == 0  # a lock with no owner wedging is no failure
    wedged = dataclasses.replace(rows[0], wedged=True, wedged_after=2000, failed=True)
    assert report.exit_status([wedged]) == 1
    assert any(n.startswith("FAILED: robust guards wedged: mutex-sysv")
               for n in report.notes([wedged]))


def test_scenario_all_keeps_its_meaning_and_crash_runs_when_named() -> None:
    from ipcfork.cli import build_parser

    def scenarios(text: str) -> list[str]:
        return list(build_parser().parse_args(["race", "--scenario", text]).scenario)

    assert scenarios("all") == list(race.SCENARIOS) and "crash" not in race.SCENARIOS
    assert scenarios("all,crash") == [*race.SCENARIOS, "crash"]
    assert parse_kill_every("0.5ms..4ms") == pytest.approx((0.0005, 0.004))
    assert parse_kill_every("2ms") == pytest.approx((0.002, 0.002))


def _documented_json() -> Any:
    """The crash JSON example in docs/races.md (the block after its marker)."""
    with open(DOCS) as source:
        text = source.read()
    block = text.split("<!-- crash-json -->", 1)[1].split("```json\n", 1)[1]
    return json.loads(block.split("```", 1)[0])


def test_cli_crash_json_has_the_documented_shape_and_exit_status() -> None:
    # mp-lock wedges only once a kill lands inside its critical section: within 0.5 s on an
    # idle machine nearly always, not always on a busy one.  Run again until it has (the
    # shape of a wedged run is what the docs show).
    for _ in range(6):
        done = _cli("--scenario", "crash", "--guard", "mutex-sysv", "--guard", "mp-lock",
                    "--workers", "2", "--duration", "0.5", "--stall", str(ROOMY_STALL),
                    "--json")
        assert done.returncode == 0, done.stderr  # mp-lock wedging is the lesson, no failure
        doc = json.loads(done.stdout)
        if doc["runs"][1]["wedged"]:
            break
    documented = _documented_json()
    assert doc.keys() == documented.keys()
    assert doc["config"].keys() == documented["config"].keys()
    assert doc["config"]["crash"].keys() == documented["config"]["crash"].keys()
    documented_run = documented["runs"][0]
    for run in doc["runs"]:
        assert run.keys() == documented_run.keys()
    sysv, mp_lock = doc["runs"]
    assert (sysv["guard"], sysv["verdict"], sysv["wedged"]) == ("mutex-sysv", "never wedged",
                                                                False)
    assert sysv["kills"] > 0 and isinstance(sysv["owner_died"], int)
    assert mp_lock["wedged"] and mp_lock["owner_died"] is None and not mp_lock["failed"]
    assert mp_lock["verdict"] == (f"wedged after {mp_lock['wedged_after']:,} kill"
                                  + ("s" if mp_lock["wedged_after"] != 1 else ""))
    assert doc["exit_status"] == 0


def test_cli_crash_exits_1_when_a_robust_guard_wedges() -> None:
    # No robust guard wedges on purpose, so this one is told it is robust: mp-lock.
    code = ("import dataclasses, sys\n"
            "from ipcfork.race import guards\n"
            "guards.GUARDS['mp-lock'] = dataclasses.replace(guards.GUARDS['mp-lock'], "
            "robust=True)\n"
            "from ipcfork.cli import main\n"
            "sys.exit(main(['race', '--scenario', 'crash', '--guard', 'mp-lock', "
            "'--workers', '2', '--duration', '20', '--stall', '0.3']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    assert "FAILED: robust guards wedged: mp-lock" in done.stdout


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_crash_ctrl_c_or_sigterm_mid_storm_leaves_nothing(signum: int, status: int) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ipcfork", "race", "--scenario", "crash",
                             "--guard", "posix-sem", "--guard", "mutex-sysv",
                             "--duration", "30", "--stall", "30"],
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    try:
        _read_until(master, rb"\b[1-9]\d*%")  # the kills are under way
        workers = _children_of(proc.pid)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
        said = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status and out == ""
    lines = [ln for ln in said.decode().replace("\r", "\n").split("\n") if ln.strip()]
    assert lines[-1] == "ipcfork race: interrupted; workers stopped, nothing left behind"
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}")
    # No IPC object left (the posix semaphore, the counter's segment): the autouse fixture.
