"""Signals to a parent running a ForkPool (run as a subprocess): SIGINT, SIGTERM, a second
Ctrl-C, and SIGKILL of the parent.  Afterwards no child, no zombie, no IPC object."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ipcfork import testing

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import ipcfork
    from ipcfork import testing

    stubborn = sys.argv[1] in ("stubborn", "held")
    held = sys.argv[1] == "held"
    persistent = sys.argv[1] == "persistent"
    zygote = sys.argv[1] == "zygote"

    def task(i):
        if stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(120)

    pool = ipcfork.ForkPool(3, grace=30 if stubborn else 1, zygote=zygote,
                            tasks_per_child=None if persistent else 1)
    futures = [pool.submit(task, i) for i in range(6)]
    try:  # from here on a Ctrl-C must land in the handler below
        def started():
            if zygote:  # the tasks' children are the zygote's, not ours
                return testing.children() + [f.record.pid for f in futures if f.record.pid]
            return testing.children()
        while len(started()) < 3:
            time.sleep(0.01)
        print(json.dumps(started()), flush=True)
        if held:  # as if the Ctrl-C landed in Future.exception(), between its lock and wait
            with futures[0]._condition:
                while True:
                    signal.pause()
        for f in futures:
            if not f.cancelled():
                f.exception()
    except KeyboardInterrupt:
        left = testing.children()
        handler_back = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        cancelled = sum(f.cancelled() for f in futures)
        assert all(f.done() for f in futures)
        print(json.dumps({"left": left, "handler_back": handler_back,
                          "cancelled": cancelled}), flush=True)
        sys.exit(0)
""")


def _start(mode: str = "polite") -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                            text=True)
    _STARTED.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "the script did not start its children"
    children = json.loads(proc.stdout.readline())
    assert len(children) >= 3
    return proc, children


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_orphans_left() -> object:
    before = testing.snapshot()
    yield
    while _STARTED:  # a failed test's script too: killed, reaped, its pipe closed
        proc = _STARTED.pop()
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert not (testing.snapshot() - before)


@pytest.mark.parametrize("mode", ["polite", "persistent", "zygote"])
def test_sigint_stops_kills_reaps_and_reraises(mode: str) -> None:
    proc, children = _start(mode)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["left"] == [] and report["handler_back"] is True
    if mode == "polite":
        assert report["cancelled"] == 3  # the three never forked
    assert testing.wait_gone(children) == []


@pytest.mark.parametrize("mode", ["polite", "persistent", "zygote"])
def test_sigterm_kills_children_and_dies_by_sigterm(mode: str) -> None:
    proc, children = _start(mode)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert testing.wait_gone(children) == []


@pytest.mark.parametrize("mode", ["stubborn", "held"])
def test_second_ctrl_c_kills_at_once(mode: str) -> None:
    """Children ignore SIGTERM and the grace is 30 s: only the second Ctrl-C ends it soon.
    "held": the first lands while the main thread holds a future's lock, which the
    manager needs to resolve that future (it used to wait for the handler, and the handler
    for it, each further Ctrl-C adding another 35 s wait)."""
    proc, children = _start(mode)
    assert proc.stdout is not None
    try:
        # Signals of one kind do not queue: press Ctrl-C again until the parent reports,
        # waiting on its output between presses.  Well before the 30 s grace would end.
        first_press = time.monotonic()
        for _ in range(40):
            proc.send_signal(signal.SIGINT)
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                break
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - first_press < 20  # not the grace, nor a wedge
        report = json.loads(out.strip().splitlines()[-1])
        assert report["left"] == [] and report["cancelled"] == 3
        assert testing.wait_gone(children) == []
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["polite", "zygote"])
def test_parent_sigkilled_children_die_too(mode: str) -> None:
    proc, children = _start(mode)
    proc.kill()
    proc.communicate(timeout=60)
    assert testing.wait_gone(children) == []
