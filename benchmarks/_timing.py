"""Interleaved timing: candidates and their baseline share one run, so drift hits both."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    funcs: dict[str, Callable[[], object]], *, inner: int, rounds: int = 31
) -> dict[str, float]:
    """Median seconds per call of each function, timing them in alternating rounds."""
    for f in funcs.values():  # warm up
        for _ in range(max(1, inner // 10)):
            f()
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, f in funcs.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


Row = tuple[str, float, bool]  # what was measured, its value, whether it met its target


def report(rows: list[Row], check: bool) -> int:
    """Print the verdict table; the exit code is 1 only when ``check`` and a target was missed."""
    print()
    for name, value, ok in rows:
        print(f"  {name:48s} {value:12,.3f}  {verdict(ok)}")
    return 1 if check and not all(ok for *_, ok in rows) else 0
