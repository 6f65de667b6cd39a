"""Fault-budget subsumption (``explorer._Coverage``): sound, and it does reduce.

Every state the explorer would reach without it is covered by a state it keeps: the
same key but for the budget and hurt flags, with at least that budget and no request
hurt that the reached state leaves unhurt (``abstraction.covers``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from resumekit.properties import explorer
from resumekit.properties.abstraction import budget_split, covers
from resumekit.properties.bounds import ADVERSARY_BOUNDS, QUICK_BOUNDS, Bounds
from resumekit.properties.explorer import explore_partition, partitions
from resumekit.properties.model import Harness
from resumekit.properties.strategies import strategy


def _kept_and_reached(
    bounds: Bounds, monkeypatch: pytest.MonkeyPatch
) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]], int, int]:
    """The keys the explorer keeps with coverage, the keys it reaches without, and the
    states each counts."""
    epoch = strategy("epoch")
    totals = partitions(bounds, epoch)[0]  # one partition: the key leaves totals out
    kept: set[tuple[Any, ...]] = set()
    real = explorer._Coverage.covered

    def recording(self: explorer._Coverage, k: tuple[Any, ...], new: int) -> int:
        j = real(self, k, new)
        if j == new:
            kept.add(k)
        return j

    with monkeypatch.context() as m:
        m.setattr(explorer._Coverage, "covered", recording)
        on = explore_partition(bounds, epoch, totals)
    reached: set[tuple[Any, ...]] = set()

    def everything(self: explorer._Coverage, k: tuple[Any, ...], new: int) -> int:
        reached.add(k)
        return new

    with monkeypatch.context() as m:
        m.setattr(explorer._Coverage, "covered", everything)
        off = explore_partition(bounds, epoch, totals)
    assert on.complete and off.complete and on.violation is None and off.violation is None
    return kept, reached, on.states, off.states


@pytest.mark.parametrize(
    "bounds",
    [
        QUICK_BOUNDS,
        replace(ADVERSARY_BOUNDS["id reuse"], reuse="lifo"),
        replace(ADVERSARY_BOUNDS["squeezed pool"], reuse="fifo"),
        replace(ADVERSARY_BOUNDS["restart and squeeze"], reuse="lifo"),
    ],
    ids=["quick", "id reuse", "squeezed pool", "restart and squeeze"],
)
def test_every_state_reached_without_coverage_is_covered_by_one_kept(
    bounds: Bounds, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, reached, with_it, without = _kept_and_reached(bounds, monkeypatch)
    assert with_it == len(kept) < without == len(reached)
    by_rest: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for k in kept:
        rest, faults = budget_split(k)
        by_rest.setdefault(rest, []).append(faults)
    assert kept <= reached  # nothing it keeps is out of reach
    for k in reached:
        rest, faults = budget_split(k)
        assert any(covers(other, faults) for other in by_rest.get(rest, ())), k


def test_covers_compares_budget_and_hurt_each_way() -> None:
    full, spent = ((1, 1, 0), (False, False)), ((1, 0, 0), (False, False))
    hurt = ((1, 1, 0), (False, True))
    assert covers(full, spent) and not covers(spent, full)
    assert covers(full, hurt)  # a request hurt is judged less strictly
    assert not covers(hurt, full)  # one not hurt must succeed: hurt cannot stand for it
    assert not covers(((0, 2, 0), (False, False)), full)  # more of one, less of another
    assert covers(full, full)


def test_the_drop_counters_start_past_zero_so_a_reset_shows_at_the_first_drop() -> None:
    """With the counters out of the key, a count reset to 1 showed only where the kept
    state had counted before; the planted orphan-count bug slipped through the coverage."""
    harness = Harness(ADVERSARY_BOUNDS["sender restart"], strategy("epoch"))
    w = harness.initial_world((1, 1))
    rs, sn = w.receiver.snapshot(), w.sender.snapshot()
    assert (rs.stale_statuses, rs.orphan_statuses, rs.malformed_statuses) == (1, 1, 1)
    assert (sn.rounds_served, sn.repeated_posts, sn.stale_posts, sn.malformed_posts) == (1,) * 4
    old = w.sender
    for action in [("add", 0), ("restart",), ("step",), ("event",), ("step",)]:
        harness.apply(w, action)
    assert w.sender is not old  # a fresh sender connected, counting from 1 too
    assert w.sender.snapshot().stale_posts == 1
