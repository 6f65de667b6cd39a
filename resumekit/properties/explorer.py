"""Bounded exhaustive exploration of the protocol model, breadth first.

Every reachable state of :class:`~resumekit.properties.model.ProtocolModel` is
visited once (states are hashed; allocation generations are renumbered by age,
the symmetry reduction). Safety invariants are checked on every transition;
at the end, no-leak and fault-free success are checked at every done state and
liveness by proving a done state reachable from every reachable state. Breadth
first means the first violation found has the shortest trace.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from resumekit.properties.invariants import LIVENESS, InvariantViolation
from resumekit.properties.model import Bounds, ProtocolModel, State, action_text
from resumekit.statemachine.dedup import RoundFilter


@dataclass
class Counterexample:
    invariant: str
    detail: str
    totals: tuple[int, ...]
    actions: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"violates {self.invariant}: {self.detail}",
            f"  requests' totals (tokens = blocks): {list(self.totals)}",
        ]
        lines += [f"  {i}. {a}" for i, a in enumerate(self.actions, 1)]
        return "\n".join(lines)


@dataclass
class Exploration:
    strategy: str
    bounds: Bounds
    states: int = 0
    transitions: int = 0
    done_states: int = 0
    seconds: float = 0.0
    complete: bool = False
    violation: Counterexample | None = None

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds else 0.0


def explore(
    bounds: Bounds,
    round_filter: RoundFilter,
    *,
    workers: int | None = None,
    max_states: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Exploration:
    """Explore every state reachable under ``bounds``; each partition stops at its first violation.

    The requests' totals never change, so the state space splits exactly by
    them; the partitions are explored in parallel on ``workers`` processes
    (default: one per CPU). The shortest counterexample over all partitions is
    reported.
    """
    model = ProtocolModel(bounds, round_filter)
    seeds = list(model.initial_states())
    start = time.perf_counter()
    if workers is None:
        workers = min(len(seeds), os.cpu_count() or 1)
    parts: list[Exploration]
    if workers <= 1 or len(seeds) == 1:
        parts = []
        for s in seeds:
            parts.append(_explore_from(model, [s], max_states, progress))
            if progress is not None:
                progress(sum(p.states for p in parts))
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            # Largest partitions first (larger totals, more rounds), to balance the workers.
            seeds.sort(key=lambda s: sorted(s.totals, reverse=True), reverse=True)
            jobs = [(bounds, round_filter, s, max_states) for s in seeds]
            parts = []
            for part in pool.imap_unordered(_job, jobs):
                parts.append(part)
                if progress is not None:
                    progress(sum(p.states for p in parts))
    result = Exploration(round_filter.name, bounds)
    result.states = sum(p.states for p in parts)
    result.transitions = sum(p.transitions for p in parts)
    result.done_states = sum(p.done_states for p in parts)
    result.seconds = time.perf_counter() - start
    found = [p.violation for p in parts if p.violation is not None]
    if found:
        result.violation = min(found, key=lambda v: (len(v.actions), v.totals))
    result.complete = not found and all(p.complete for p in parts)
    return result


def _job(args: tuple[Bounds, RoundFilter, State, int | None]) -> Exploration:
    bounds, round_filter, seed, max_states = args
    return _explore_from(ProtocolModel(bounds, round_filter), [seed], max_states, None)


def _explore_from(
    model: ProtocolModel,
    seeds: list[State],
    max_states: int | None,
    progress: Callable[[int], None] | None,
) -> Exploration:
    """Breadth-first search from ``seeds``; stops at the first violation."""
    # States are tuples of ints: no cycles for the collector to find, only millions
    # of young objects for it to scan. Pausing it makes the search about a third faster.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _bfs(model, seeds, max_states, progress)
    finally:
        if collecting:
            gc.enable()


def _bfs(
    model: ProtocolModel,
    seeds: list[State],
    max_states: int | None,
    progress: Callable[[int], None] | None,
) -> Exploration:
    result = Exploration(model.filter.name, model.bounds)
    start = time.perf_counter()
    index: dict[State, int] = {}
    states: list[State] = []
    parent = array("q")
    via: list[tuple[object, ...] | None] = []
    src, dst = array("q"), array("q")

    def add(s: State, p: int, action: tuple[object, ...] | None) -> int:
        j = len(states)
        index[s] = j
        states.append(s)
        parent.append(p)
        via.append(action)
        return j

    def trace(i: int) -> list[str]:
        steps: list[str] = []
        while parent[i] >= 0:
            action = via[i]
            assert action is not None
            steps.append(action_text(action, states[parent[i]]))
            i = parent[i]
        return steps[::-1]

    queue: deque[int] = deque(add(s, -1, None) for s in seeds)
    actions, next_state = model.actions, model.next_state
    while queue:
        i = queue.popleft()
        s = states[i]
        for action in actions(s):
            try:
                t = next_state(s, action)
            except InvariantViolation as v:
                result.violation = Counterexample(
                    v.invariant, v.detail, s.totals, [*trace(i), action_text(action, s)]
                )
                return _finish(result, states, start, src)
            n = len(states)
            j = index.setdefault(t, n)  # one hash per successor
            if j == n:
                states.append(t)
                parent.append(i)
                via.append(action)
                queue.append(j)
            src.append(i)
            dst.append(j)
        if progress is not None and i % 4096 == 0:
            progress(len(states))
        if max_states is not None and len(states) >= max_states:
            return _finish(result, states, start, src)
    _check_done_and_liveness(model, result, states, src, dst, trace)
    result.complete = result.violation is None
    return _finish(result, states, start, src)


def _check_done_and_liveness(
    model: ProtocolModel,
    result: Exploration,
    states: list[State],
    src: array[int],
    dst: array[int],
    trace: Callable[[int], list[str]],
) -> None:
    done = [i for i, s in enumerate(states) if model.is_done(s)]
    result.done_states = len(done)
    for i in done:  # in BFS order: the first problem has the shortest trace
        problems = model.done_problems(states[i])
        if problems:
            invariant, detail = problems[0]
            result.violation = Counterexample(invariant, detail, states[i].totals, trace(i))
            return
    # Liveness: walk the edges backwards from every done state.
    n = len(states)
    first = array("q", bytes(8 * (n + 1)))
    for j in dst:
        first[j + 1] += 1
    for k in range(n):
        first[k + 1] += first[k]
    fill = array("q", first)
    preds = array("q", bytes(8 * len(dst)))
    for i, j in zip(src, dst, strict=True):
        preds[fill[j]] = i
        fill[j] += 1
    reaches = bytearray(n)
    todo = deque(done)
    for i in done:
        reaches[i] = 1
    while todo:
        j = todo.popleft()
        for k in range(first[j], first[j + 1]):
            i = preds[k]
            if not reaches[i]:
                reaches[i] = 1
                todo.append(i)
    stuck = reaches.find(0)
    if stuck >= 0:
        # Show the way into a dead end: the shallowest state with nowhere to go.
        has_exit = bytearray(n)
        for i in src:
            has_exit[i] = 1
        stuck = next((i for i in range(stuck, n) if not reaches[i] and not has_exit[i]), stuck)
        s = states[stuck]
        waiting = [f"r{r}" for r, req in enumerate(s.reqs) if not req.state.terminal]
        result.violation = Counterexample(
            LIVENESS,
            f"from here no terminal state is reachable ({', '.join(waiting) or 'nothing'} "
            "never finishes)",
            s.totals,
            trace(stuck),
        )


def _finish(result: Exploration, states: list[State], start: float, src: array[int]) -> Exploration:
    result.states = len(states)
    result.transitions = len(src)
    result.seconds = time.perf_counter() - start
    return result


#: What ``resumekit verify`` exhausts: 5 blocks, 2 requests, up to 5 rounds each, every fault.
STANDARD_BOUNDS = Bounds(blocks=5, requests=2, max_rounds=5)

__all__ = ["STANDARD_BOUNDS", "Counterexample", "Exploration", "explore"]
