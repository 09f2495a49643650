"""The supervised service mode: :class:`Service` turns this process into a pre-fork
supervisor whose workers run one function for ever, in the manner of gunicorn's arbiter.

How the parts fit::

    Service(work, workers=4).run()
      supervisor.py   the loop: signals queue, children reaped, heartbeats checked,
                      replacements forked with backoff, crash loop stops it
      worker.py       each forked worker: WorkerContext (index, generation, stopping,
                      heartbeat()), signal handlers, os._exit
      status.py       the status table in shared memory: one row per worker, heartbeat
                      words written by the workers, read by the loop and `ipcfork status`
      descendants.py  subreaper, the sentinel that kills the workers' group when the
                      supervisor dies, the sweep at stop
      pidfile.py      the locked, atomically written pidfile
      notify.py       systemd's notify protocol (READY, RELOADING, STOPPING, WATCHDOG)
      restarts.py     backoff per slot and the crash-loop rule
      command.py      `ipcfork serve` and `ipcfork status`

The user's guide is ``docs/service.md``.
"""

from .service import Service
from .worker import WorkerContext

__all__ = ["Service", "WorkerContext"]
