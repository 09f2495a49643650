"""ForkPool (placeholder docstring, rewritten with the dispatcher redesign)."""

from .executor import ForkPool
from .tasks import TaskFuture, TaskRecord

__all__ = ["ForkPool", "TaskFuture", "TaskRecord"]
