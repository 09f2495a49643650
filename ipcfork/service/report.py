"""The status table in words: what ``ipcfork status`` prints on a terminal and what SIGUSR1
writes to the log."""

from __future__ import annotations

from typing import Any

__all__ = ["duration", "size", "status_lines"]


def duration(seconds: float) -> str:
    """``0.4s``, ``12.0s``, ``3m05s``, ``2h10m``, ``3d04h``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def size(nbytes: int | None) -> str:
    """``12.3M``-style sizes (``?`` when unknown)."""
    if nbytes is None:
        return "?"
    value = float(nbytes)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "?"  # pragma: no cover


def status_lines(summary: dict[str, Any]) -> list[str]:
    """One title line, one header line and one line per worker."""
    lines = [f"service {summary['name']} (pid {summary['pid']}): {summary['state']}, "
             f"generation {summary['generation']}, {summary['workers_wanted']} workers wanted, "
             f"up {duration(summary['uptime'])}, {summary['restarts']} restarts"]
    lines.append(f"{'slot':>4} {'pid':>8} {'gen':>4} {'uptime':>8} {'units':>9} "
                 f"{'heartbeat':>9} {'rss':>8} {'restarts':>8}  state")
    for worker in summary["workers"]:
        lines.append(
            f"{worker['slot']:>4} {worker['pid']:>8} {worker['generation']:>4} "
            f"{duration(worker['uptime']):>8} {worker['units']:>9} "
            f"{duration(worker['heartbeat_age']) + ' ago':>9} {size(worker['rss']):>8} "
            f"{worker['restarts']:>8}  {worker['state']}")
    return lines
