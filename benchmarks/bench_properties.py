"""Checker throughput, each against a baseline measured in the same run.

    python benchmarks/bench_properties.py [--check]

1. the bounded explorer over the real receiver, sender and allocator on the standard
   bounds (epoch, lifo and fifo reuse) and on every adversary set: states/s, against a
   bare breadth-first search that only hashes and stores as many tuples; the target is
   the standard bounds exhausted for both reuse orders in <= 10x the time of a bare BFS
   over 1,000,000 tuple states, measured in the same run;
2. the Hypothesis protocol machine (epoch): steps/s, against a machine whose rules do nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from dataclasses import replace

from _timing import Row, report  # benchmarks/ is on sys.path as the script's dir
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from resumekit.properties.bounds import ADVERSARY_BOUNDS, STANDARD_BOUNDS
from resumekit.properties.explorer import explore
from resumekit.properties.fuzz import fuzz
from resumekit.properties.strategies import strategy


def bare_bfs(n: int) -> float:
    """Seconds to discover ``n`` states of a trivial tuple-valued graph: the floor of any BFS."""
    start = time.perf_counter()
    seen: dict[tuple[int, ...], int] = {}
    queue: deque[tuple[int, ...]] = deque([(0, 0, 0, 0)])
    while queue and len(seen) < n:
        s = queue.popleft()
        for k in range(4):
            t = (*s[:k], s[k] + 1, *s[k + 1 :])
            fresh = len(seen)
            if seen.setdefault(t, fresh) == fresh:
                queue.append(t)
    return time.perf_counter() - start


def bench_explorer() -> list[Row]:
    rows: list[Row] = []
    standard = 0.0
    for name, bounds in [("standard", STANDARD_BOUNDS), *ADVERSARY_BOUNDS.items()]:
        for reuse in ("lifo", "fifo"):
            run = explore(replace(bounds, reuse=reuse), strategy("epoch"))
            assert run.complete and run.violation is None
            floor = run.states / bare_bfs(run.states)
            rate = run.states_per_second
            print(
                f"explorer, {name} bounds, {reuse}: {run.states:,} states, "
                f"{run.transitions:,} transitions in {run.seconds:.1f}s on {os.cpu_count()} "
                f"CPU(s) = {rate:,.0f} states/s (bare BFS on one CPU: {floor:,.0f} states/s, "
                f"ratio {rate / floor:.4f})"
            )
            if name == "standard":
                standard += run.seconds
                rows.append((f"explorer states/s / bare BFS, {reuse}", rate / floor, True))
    floor = bare_bfs(1_000_000)
    print(
        f"standard bounds, both orders: {standard:.1f}s; bare BFS over 1,000,000 tuple "
        f"states: {floor:.2f}s"
    )
    ratio = standard / floor
    rows.append(
        ("standard bounds, both orders / bare BFS of 1M states (<= 10)", ratio, ratio <= 10)
    )
    return rows


class _Idle(RuleBasedStateMachine):
    steps = 0

    @rule()
    def a(self) -> None:
        type(self).steps += 1

    @rule()
    def b(self) -> None:
        type(self).steps += 1


def bench_hypothesis() -> list[Row]:
    result = fuzz("epoch", max_examples=400, database=None)
    assert not result.failed, result.format()
    start = time.perf_counter()
    run_state_machine_as_test(
        _Idle,
        settings=settings(
            max_examples=400,
            stateful_step_count=50,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    idle = _Idle.steps / (time.perf_counter() - start)
    rate = result.steps_per_second
    print(
        f"protocol machine (epoch): {result.steps:,} steps in {result.seconds:.1f}s = "
        f"{rate:,.0f} steps/s (Hypothesis alone, no-op rules: {idle:,.0f} steps/s, "
        f"ratio {rate / idle:.3f})"
    )
    return [("protocol machine steps/s / no-op machine", rate / idle, True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    rows = bench_explorer() + bench_hypothesis()
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
