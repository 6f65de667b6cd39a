"""Bounded exhaustive exploration of the real protocol objects, breadth first.

Every state is a :class:`~resumekit.properties.world.WorldState`, the values the
shipped receiver, sender and allocator hold; a successor is computed by putting
one world of those objects back into the state and calling their API
(:meth:`~resumekit.properties.model.Harness.apply`). States are deduplicated by
their abstraction (:mod:`~resumekit.properties.abstraction`), so each reachable
abstract state is visited once; the frontier keeps values, not objects.
Safety invariants are checked on every transition (the ledger and the real
code's own errors); no-leak and fault-free success at every done state; and
liveness by proving a done state reachable from every state, without the other
pool user ever returning its blocks. Breadth first means the first violation
found has the shortest trace, which is replayed from the initial world to print.
"""

from __future__ import annotations

import gc
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resumekit._check import as_int, check_bool, check_callback
from resumekit.errors import InvalidArgumentError
from resumekit.properties.abstraction import budget_split, covers
from resumekit.properties.bounds import FAIR, Bounds
from resumekit.properties.counterexample import (
    Counterexample,
    ReplayDiverged,
    replay,
    stuck,
    traced,
    unjudgeable,
    unrestorable,
    violation,
)
from resumekit.properties.forking import fork_pool
from resumekit.properties.invariants import CRASH
from resumekit.properties.model import Harness
from resumekit.properties.strategies import Strategy
from resumekit.properties.world import World, WorldState


@dataclass
class Exploration:
    strategy: str
    bounds: Bounds
    states: int = 0
    transitions: int = 0
    done_states: int = 0
    seconds: float = 0.0
    complete: bool = False
    capped: bool = False  # the deadline stopped it before every partition ran
    violation: Counterexample | None = None

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds else 0.0


def explore(
    bounds: Bounds,
    strategy: Strategy,
    *,
    workers: int | None = None,
    max_states: int | None = None,
    first_only: bool = False,
    deadline: float | None = None,
    progress: Callable[[int], None] | None = None,
    reductions: bool = True,
) -> Exploration:
    """Explore every state reachable under ``bounds``; each partition stops at its first violation.

    The requests' totals never change, so the state space splits exactly by
    them; the partitions are explored in parallel on ``workers`` processes
    (default: one per CPU) and the shortest counterexample over all of them is
    reported. ``first_only`` explores them one by one, smallest first, and stops
    at the first that has a violation (enough to show a design is broken).
    ``max_states`` caps each partition, ``deadline`` (a ``time.perf_counter()``
    value) the whole run between partitions; a capped run is not complete. ``reductions``
    off keys states as before issue 23's (:class:`~resumekit.properties.model.Harness`)
    and covers no fault budget (:class:`_Coverage`): the same verdicts, more states.
    """
    if not isinstance(bounds, Bounds):
        raise InvalidArgumentError(f"bounds must be a Bounds, not {type(bounds).__name__}")
    if not isinstance(strategy, Strategy):
        raise InvalidArgumentError(
            f"strategy must be a Strategy (properties.strategies.strategy(name)), not "
            f"{type(strategy).__name__}"
        )
    if workers is not None:
        workers = as_int(workers, "workers", minimum=1)
    check_callback(progress, "progress")
    check_bool(reductions, "reductions")
    if max_states is not None:
        max_states = as_int(max_states, "max_states", minimum=1)
    harness = Harness(bounds, strategy, reductions=reductions)
    seeds = partitions(bounds, strategy)
    start = time.perf_counter()
    if workers is None:
        workers = min(len(seeds), os.cpu_count() or 1)
    parts: list[Exploration] = []
    capped = False

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    if late():
        capped = True
    elif first_only or workers <= 1 or len(seeds) == 1:
        for totals in sorted(seeds):  # smallest first: the first finding comes soonest
            if late():
                capped = True
                break
            parts.append(_explore_from(harness, totals, max_states, progress))
            if progress is not None:
                progress(sum(p.states for p in parts))
            if first_only and parts[-1].violation is not None:
                break
    else:
        with fork_pool(workers) as pool:
            jobs = [(bounds, strategy, s, max_states, None, reductions) for s in seeds]
            for part in pool.imap_unordered(_job, jobs):
                parts.append(part)
                if progress is not None:
                    progress(sum(p.states for p in parts))
                if late() and len(parts) < len(jobs):
                    capped = True
                    pool.terminate()
                    break
    return combine(bounds, strategy, parts, partitions=len(seeds), capped=capped, start=start)


def partitions(bounds: Bounds, strategy: Strategy) -> list[tuple[int, ...]]:
    """The requests' totals of each partition of the state space, largest first.

    The totals never change, so the space splits exactly by them; larger totals
    take more rounds and have more states, so this order balances a pool of workers.
    """
    seeds = list(Harness(bounds, strategy).initial_totals())
    seeds.sort(key=lambda s: sorted(s, reverse=True), reverse=True)
    return seeds


def explore_partition(
    bounds: Bounds,
    strategy: Strategy,
    totals: tuple[int, ...],
    max_states: int | None = None,
    deadline: float | None = None,
    reductions: bool = True,
) -> Exploration:
    """One partition of :func:`explore`: every state reachable from the world with ``totals``;
    capped (and incomplete) once ``time.perf_counter()`` passes ``deadline``."""
    harness = Harness(bounds, strategy, reductions=reductions)
    return _explore_from(harness, totals, max_states, None, deadline)


def combine(
    bounds: Bounds,
    strategy: Strategy,
    parts: list[Exploration],
    *,
    partitions: int,
    capped: bool = False,
    start: float | None = None,
) -> Exploration:
    """One exploration out of the partitions explored of ``partitions``: counts summed,
    the shortest counterexample, complete only when all ran and none found anything.

    ``seconds`` is the wall time since ``start``, or (``None``) the partitions' own times summed.
    """
    result = Exploration(strategy.name, bounds)
    result.capped = capped
    result.states = sum(p.states for p in parts)
    result.transitions = sum(p.transitions for p in parts)
    result.done_states = sum(p.done_states for p in parts)
    if start is not None:
        result.seconds = time.perf_counter() - start
    else:
        result.seconds = sum(p.seconds for p in parts)
    found = [p.violation for p in parts if p.violation is not None]
    if found:
        result.violation = min(found, key=lambda v: (len(v.actions), v.totals))
    result.complete = (
        not found and not capped and len(parts) == partitions and all(p.complete for p in parts)
    )
    return result


def _job(
    args: tuple[Bounds, Strategy, tuple[int, ...], int | None, float | None, bool],
) -> Exploration:
    return explore_partition(*args)


def _explore_from(
    harness: Harness,
    totals: tuple[int, ...],
    max_states: int | None,
    progress: Callable[[int], None] | None,
    deadline: float | None = None,
) -> Exploration:
    """Breadth-first search from the world with these totals; stops at the first violation."""
    # States are small acyclic values: no cycles for the collector to find, only many
    # young objects for it to scan. Pausing it saves a good share of the time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _bfs(harness, totals, max_states, progress, deadline)
    finally:
        if collecting:
            gc.enable()


class _Graph:
    """The explored graph: parents and actions for traces, edges and done states for liveness."""

    def __init__(self) -> None:
        self.parent = array("q")
        self.via: list[tuple[Any, ...] | None] = []
        self.src, self.dst = array("q"), array("q")
        # Per edge: 0 where the other pool user gives back a block it may keep for good.
        self.patient = bytearray()
        self.done: list[int] = []  # the states where every request ended and nothing moves

    def add_state(self, parent: int, action: tuple[Any, ...] | None) -> int:
        self.parent.append(parent)
        self.via.append(action)
        return len(self.via) - 1

    def path(self, i: int) -> list[tuple[Any, ...]]:
        actions: list[tuple[Any, ...]] = []
        while self.parent[i] >= 0:
            action = self.via[i]
            assert action is not None
            actions.append(action)
            i = self.parent[i]
        return actions[::-1]


class _Coverage:
    """Fault-budget subsumption: a new key is mapped to a state already kept that differs
    from it only in budget and hurt requests, with at least its budget and no request
    hurt that it does not hurt too (:func:`~resumekit.properties.abstraction.covers`).

    Sound for every verdict: the budget and the hurt flags are the harness's own, read by
    no shipped code; a larger budget enables every fault a smaller one does and nothing
    else, and a request not hurt is judged more strictly. So the kept state can do all
    the covered one can, and anything wrong after the covered one is wrong after the kept
    one; fair steps never read either, so liveness is the same from both.
    """

    def __init__(self) -> None:
        self.kept: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], int]]] = {}

    def covered(self, k: tuple[Any, ...], new: int) -> int:
        """The kept state that covers key ``k``, or ``new`` (then kept as the state of ``k``)."""
        rest, faults = budget_split(k)
        kept = self.kept.get(rest)
        if kept is None:
            self.kept[rest] = [(faults, new)]
            return new
        for other, j in kept:
            if covers(other, faults):
                return j
        kept.append((faults, new))
        return new


def _uncovered(k: tuple[Any, ...], new: int) -> int:
    return new


def _bfs(
    harness: Harness,
    totals: tuple[int, ...],
    max_states: int | None,
    progress: Callable[[int], None] | None,
    deadline: float | None = None,
) -> Exploration:
    result = Exploration(harness.strategy.name, harness.bounds)
    start, graph = time.perf_counter(), _Graph()
    index: dict[tuple[Any, ...], int] = {}
    begun = _initial(harness, totals)
    if isinstance(begun, Counterexample):
        result.violation = begun
        return _finish(result, graph, start)
    w, first, k = begun  # the one world every state is restored into
    covered = _Coverage().covered if harness.reductions else _uncovered
    index[k] = covered(k, graph.add_state(-1, None))
    queue: deque[tuple[int, WorldState]] = deque([(0, first)])
    actions_of, apply, key = harness.actions, harness.apply, harness.key
    src, dst, patient = graph.src, graph.dst, graph.patient
    keep = harness.bounds.blocks - harness.bounds.default_blocks
    while queue:
        i, s = queue.popleft()
        refused = _restore(w, s)
        if refused is not None:  # the shipped objects refuse the state their code left
            result.violation = unrestorable(harness, totals, graph.path(i), refused)
            return _finish(result, graph, start)
        # The other pool user may keep what leaves the requests a default round; it
        # must give back anything beyond that, so only then does liveness count on it.
        excess = len(s.pressure) > keep
        for n, action in enumerate(actions_of(w, s)):
            if n and (refused := _restore(w, s)) is not None:  # refused the second time
                result.violation = unrestorable(harness, totals, graph.path(i), refused)
                return _finish(result, graph, start)
            try:
                apply(w, action)
                t = w.snapshot()
                k = key(t)
            except Exception as error:  # an invariant, or the real code raising: both findings
                result.violation = violation(harness, totals, [*graph.path(i), action], error)
                return _finish(result, graph, start)
            j = index.get(k, -1)
            if j < 0:
                j = index[k] = covered(k, len(graph.via))
            if j == len(graph.via):
                graph.add_state(i, action)
                result.violation = _judged(harness, totals, w, graph, j)
                if result.violation is not None:
                    return _finish(result, graph, start)
                queue.append((j, t))
            src.append(i)
            dst.append(j)
            patient.append(action[0] in FAIR or (excess and action[0] == "unsqueeze"))
        if i % 4096 == 0 and _checkpoint(progress, deadline, len(graph.via)):
            result.capped = True  # a seconds cap: never a verdict
            return _finish(result, graph, start)
        if max_states is not None and len(graph.via) >= max_states:
            return _finish(result, graph, start)
    result.done_states = len(graph.done)
    dead_end = _unable_to_finish(graph, graph.done)
    if dead_end is not None:
        result.violation = stuck(harness, totals, graph.path(dead_end))
    result.complete = result.violation is None
    return _finish(result, graph, start)


def _restore(w: World, s: WorldState) -> Exception | None:
    """Put ``w`` back into ``s``; what the shipped objects raised if they refused."""
    try:
        w.restore(s)
    except Exception as error:
        return error
    return None


def _initial(
    harness: Harness, totals: tuple[int, ...]
) -> tuple[World, WorldState, tuple[Any, ...]] | Counterexample:
    """The initial world, its state and key; or, where the shipped objects refuse to be
    built or primed, that finding."""
    try:
        w = harness.initial_world(totals)
        first = w.snapshot()
        return w, first, harness.key(first)
    except Exception as error:
        detail = f"the initial world cannot be built: {type(error).__name__}: {error}"
        return Counterexample(CRASH, detail, totals)


def _judged(
    harness: Harness, totals: tuple[int, ...], w: World, graph: _Graph, j: int
) -> Counterexample | None:
    """What is wrong at new state ``w`` (state ``j``) if it is done, noting it done; takes
    from ``w``. A check the shipped objects make raise is a finding too."""
    try:
        if not harness.is_done(w):
            return None
        graph.done.append(j)
        problems = harness.done_problems(w)
    except Exception as error:
        return unjudgeable(harness, totals, graph.path(j), error)
    if not problems:
        return None
    invariant, detail = problems[0]
    return traced(harness, totals, graph.path(j), invariant, detail)


def _unable_to_finish(graph: _Graph, done: list[int]) -> int | None:
    """The shallowest state from which no done state is reachable, or ``None``.

    Walks the fair edges backwards from the done states: liveness must not depend
    on a fault (an abort, a restart, a forgery ends a request too) nor on the other
    pool user giving back blocks it may keep.
    """
    n = len(graph.via)
    src, dst, patient = graph.src, graph.dst, graph.patient
    first = array("q", bytes(8 * (n + 1)))
    for e, j in enumerate(dst):
        if patient[e]:
            first[j + 1] += 1
    for k in range(n):
        first[k + 1] += first[k]
    fill = array("q", first)
    preds = array("q", bytes(8 * first[n]))
    for e, (i, j) in enumerate(zip(src, dst, strict=True)):
        if patient[e]:
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
    if stuck < 0:
        return None
    # Show the way into a dead end: the shallowest state with nowhere (patient) to go.
    has_exit = bytearray(n)
    for e, i in enumerate(src):
        if patient[e]:
            has_exit[i] = 1
    return next((i for i in range(stuck, n) if not reaches[i] and not has_exit[i]), stuck)


def _checkpoint(
    progress: Callable[[int], None] | None, deadline: float | None, states: int
) -> bool:
    """Report ``states`` explored; whether the seconds cap has passed."""
    if progress is not None:
        progress(states)
    return deadline is not None and time.perf_counter() >= deadline


def _finish(result: Exploration, graph: _Graph, start: float) -> Exploration:
    result.states = len(graph.via)
    result.transitions = len(graph.src)
    result.seconds = time.perf_counter() - start
    return result


__all__ = [
    "Counterexample",
    "Exploration",
    "ReplayDiverged",
    "combine",
    "explore",
    "explore_partition",
    "partitions",
    "replay",
]
