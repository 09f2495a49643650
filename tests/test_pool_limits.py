"""ForkPool when the system refuses to fork: a process-count limit from the kernel's pids
cgroup (RLIMIT_NPROC does not bind root), applied to a pool running in a subprocess."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap

import pytest

_PIDS_ROOT = "/sys/fs/cgroup/pids"
needs_pids_cgroup = pytest.mark.skipif(not os.path.isdir(_PIDS_ROOT),
                                       reason="no cgroup v1 pids controller")

# Every script below starts with this: it moves itself into the limited cgroup (its children
# follow), and has a way to read how many forks the cgroup refused and to expect a refusal.
_PREAMBLE = textwrap.dedent("""
    import os, sys
    import ipcfork
    from ipcfork import testing

    cgroup = sys.argv[1]
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))

    def refusals() -> int:
        with open(os.path.join(cgroup, "pids.events")) as events:
            return int(events.read().split()[1])

    def first() -> int:  # holds its process until the cgroup has refused a fork
        while refusals() == 0:
            os.sched_yield()
        return -1

    def set_limit(limit: int) -> None:
        with open(os.path.join(cgroup, "pids.max"), "w") as pids_max:
            pids_max.write(str(limit))

    def refused(future) -> None:
        try:
            future.result(timeout=60)
        except ipcfork.LimitExceededError as exc:
            assert "out of processes" in str(exc) and exc.limit, exc
        else:
            raise AssertionError("a fork succeeded past pids.max")
""")


# Runs inside the limited cgroup: the main thread, the pool's manager thread and one child
# fit under pids.max=3, so a second concurrent fork fails with EAGAIN.  The first child
# stays alive until the cgroup has counted a refused fork, so the refusal is certain.
_SCRIPT = textwrap.dedent("""
    with ipcfork.ForkPool(4) as pool:
        futures = [pool.submit(first)] + [pool.submit(abs, -i) for i in range(1, 8)]
        results = [f.result(timeout=60) for f in futures]
        again = pool.submit(abs, -9).result(timeout=60)
    assert results == [-1, 1, 2, 3, 4, 5, 6, 7], results
    assert again == 9
    print(refusals())
""")


def _make_cgroup(limit: int) -> str:
    path = os.path.join(_PIDS_ROOT, f"ipcfork-test-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as pids_max:
            pids_max.write(str(limit))
    except OSError as exc:
        if os.path.isdir(path):
            os.rmdir(path)
        pytest.skip(f"cannot make a pids cgroup here: {exc}")
    return path


def _run_limited(limit: int, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new pids cgroup of ``limit`` processes, then remove the cgroup
    (empty again once the script and its children have exited)."""
    cgroup = _make_cgroup(limit)
    try:
        return subprocess.run([sys.executable, "-c", _PREAMBLE + script, cgroup],
                              capture_output=True, text=True, timeout=120)
    finally:
        os.rmdir(cgroup)


@needs_pids_cgroup
def test_refused_forks_wait_for_a_child_to_end_instead_of_failing_tasks() -> None:
    run = _run_limited(3, _SCRIPT)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 1  # the kernel did refuse forks, and every task still ran


# Under pids.max=2 the main thread and the manager thread use both: no child can be forked,
# nothing of ours could free one, so each task fails at once, clearly, and the pool lives.
_NO_ROOM = textwrap.dedent("""
    with ipcfork.ForkPool(2) as pool:
        for _ in range(2):
            refused(pool.submit(abs, -1))
    print("ok")
""")


@needs_pids_cgroup
def test_a_fork_refused_with_no_child_to_wait_for_fails_its_task_clearly() -> None:
    run = _run_limited(2, _NO_ROOM)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# Zygote mode under pids.max=4: the main thread, the manager thread, the zygote and one task
# child fit, so the zygote's second fork is refused.  It must wait for its child to end and
# fork again (the refusal once killed the zygote and failed every task as a crash).
_ZYGOTE_WAITS = textwrap.dedent("""
    with ipcfork.ForkPool(2, zygote=True) as pool:
        futures = [pool.submit(first)] + [pool.submit(abs, -i) for i in range(1, 6)]
        results = [f.result(timeout=60) for f in futures]
    assert results == [-1, 1, 2, 3, 4, 5], results
    print(refusals())
""")


@needs_pids_cgroup
def test_a_zygote_whose_fork_is_refused_waits_for_its_child_and_forks_again() -> None:
    run = _run_limited(4, _ZYGOTE_WAITS)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 1  # the kernel did refuse the zygote's fork


# Under pids.max=3 the zygote has no room for any child and no child to wait for: each task
# fails clearly, and the zygote and the pool live on (a later task runs once room is made).
_ZYGOTE_NO_ROOM = textwrap.dedent("""
    with ipcfork.ForkPool(2, zygote=True) as pool:
        zygote = testing.children()
        for _ in range(2):
            refused(pool.submit(abs, -1))
        assert testing.children() == zygote  # the same zygote, alive
        set_limit(4)
        assert pool.submit(abs, -7).result(timeout=60) == 7
    print("ok")
""")


@needs_pids_cgroup
def test_a_zygote_with_no_child_to_wait_for_fails_the_task_and_lives() -> None:
    run = _run_limited(3, _ZYGOTE_NO_ROOM)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# Persistent workers: a task lowers pids.max to what is left after its worker dies, then
# kills the worker.  The retry finds no worker and cannot fork one, so the retried future,
# RUNNING already, must fail with the fork error; it once made the manager call
# set_running_or_notify_cancel() on it, which raised and failed every future.
_WORKER_RETRY_NO_ROOM = textwrap.dedent("""
    def squeeze_and_die() -> None:
        set_limit(2)  # the main thread and the manager: no room for a worker
        os._exit(1)

    with ipcfork.ForkPool(1, tasks_per_child=None, retries=1) as pool:
        future = pool.submit(squeeze_and_die)
        refused(future)
        # The first attempt ran (its worker exited 1); the retry never started.
        assert future.record.attempts == 1 and future.record.exitcode == 1, future.record
        set_limit(3)
        assert pool.submit(abs, -5).result(timeout=60) == 5  # the manager lives
    print("ok")
""")


@needs_pids_cgroup
def test_a_retry_that_finds_no_worker_and_cannot_fork_fails_only_its_task() -> None:
    run = _run_limited(3, _WORKER_RETRY_NO_ROOM)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
