"""ForkPool: the seed's fork manager as a ``concurrent.futures.Executor``.

Parts: ``executor`` (the public class), ``options`` (checked once), ``manager`` (the one
manager thread: its loop, the outcome path, stops), ``deadlines`` (timeouts), one
dispatcher per mode (``per_task``, ``workers``, ``zygote``, behind
``dispatcher.Dispatcher``), ``streaming`` (``imap_unordered``), and what they share:
``child`` (the child's side of a task), ``transfer`` (outcomes in shared memory),
``reaper`` (pidfds and ``wait4``), ``signals``, ``logs``, ``forksafety``, ``progress``.

Data flow, fork per task (``tasks_per_child=1``, the default)::

    submit(fn, *args) ──> pending deque ──(manager: a slot is free)──> fork()
        child: die-with-parent, reset signals, initializer, fn(*args)
               └─> ONE outcome into its arena slot (a large one into its own shm object,
                   named before the fork), the slot's done word last, then _exit
               (or it dies: SIGKILL, SIGSEGV, os._exit, timeout)
    manager: the child's pidfd polls readable ──> wait4 (status + rusage)
             ──> Manager.finish: read the slot ──> resolve the future

Persistent workers (``tasks_per_child=None`` or ``N``)::

    submit ──> pending ──(manager: a worker has room, up to 8 queued)──> task pipe
               (the call pickled: u32 length, slot, spill name, call)
        worker: loop { read a task, run it, outcome into the slot, u32 slot on the done pipe }
    manager: done pipe readable ──> Manager.finish (no exit: exited=None)
             worker died ──> its running task: Manager.finish with its exit (a crash unless
                             the slot is complete); its queued tasks: back to the front

Zygote (``zygote=True``)::

    ForkPool() forks the zygote at once (small, single-threaded)
    submit ──> pending ──(manager: a slot is free)──> command pipe (the call pickled)
        zygote: fork ──> the task's child, as in fork per task; wait4 it; report
                "S" (started, pid), "E" (ended, status + rusage) or "F" (fork refused with
                no child to wait for; a refusal while children run waits for one to end)
    manager: event pipe readable ──> Manager.finish on "E"; timeouts and stops go to the
             zygote as kill commands (it signals only children it has not reaped)

Every mode: the parent reads an outcome only after the child exited (``wait4``) or the
worker posted the slot, and the slot's done word, written last, equals the outcome's length
only if the writer finished.  A dead writer leaves ``done == 0``, which reads as a crash.
Timeouts are one path for all modes: SIGTERM at the deadline, one SIGKILL ``grace`` seconds
later, then only waiting for the exit.
"""

from .executor import ForkPool
from .tasks import TaskFuture, TaskRecord
from .transfer import result_buffer

__all__ = ["ForkPool", "TaskFuture", "TaskRecord", "result_buffer"]
