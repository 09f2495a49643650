"""What bench_pool.py and its section modules share: the run-failed error, round-robin
repetitions and target lines."""

from __future__ import annotations

import mmap
import statistics
import sys
from collections.abc import Callable

from _common import rotated, verdict

__all__ = ["MIB", "PAGE", "RunFailed", "Variant", "flush_std", "ratio_line", "run_reps"]

Variant = tuple[str, Callable[[], float]]  # (label, one timed run returning its figure)
PAGE = mmap.PAGESIZE
MIB = 1 << 20


class RunFailed(Exception):
    """A run went wrong: a wrong result or a child that failed."""


def flush_std() -> None:
    """Children that flush inherited stdio buffers (multiprocessing) must find them empty."""
    sys.stdout.flush()
    sys.stderr.flush()


def ratio_line(what: str, num: list[float], den: list[float], limit: float,
               higher_is_better: bool = True) -> str:
    ratio = statistics.median(num) / statistics.median(den)
    paired = [a / b for a, b in zip(num, den, strict=True)]
    ok = ratio >= limit if higher_is_better else ratio < limit
    sign = ">=" if higher_is_better else "<"
    return (f"- target: {what} = {ratio:.2f}x (per-repetition {min(paired):.2f}x.."
            f"{max(paired):.2f}x), target {sign} {limit}x: {verdict(ok)}")


def run_reps(variants: list[Variant], reps: int,
             warmup: bool = True) -> dict[str, list[float]]:
    """Warm every variant up once, then ``reps`` round-robin repetitions; samples by label."""
    if warmup:
        for _, run in variants:
            flush_std()
            run()
    samples: dict[str, list[float]] = {label: [] for label, _ in variants}
    for rep in range(reps):
        for label, run in rotated(variants, rep):
            flush_std()
            samples[label].append(run())
    return samples
