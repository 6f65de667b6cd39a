"""The request symmetry the explorer relies on holds for the code that runs, and folding
it changes the state counts, never the verdicts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumekit.properties.abstraction import batch_order, key, renamed, status_order
from resumekit.properties.bounds import ADVERSARY_BOUNDS, QUICK_BOUNDS, Bounds
from resumekit.properties.explorer import explore, explore_partition, partitions
from resumekit.properties.model import Harness
from resumekit.properties.strategies import strategy
from resumekit.properties.world import World

#: Every fault kind, on two requests of one total: the mirror of each run is a run.
ALL_FAULTS = Bounds(
    blocks=3,
    requests=2,
    max_rounds=2,
    squeezes=1,
    forgeries=1,
    reuses=1,
    restarts=1,
    poisons=1,
    batches=True,
    late_sources=True,
)


def _mirrored(action: tuple[Any, ...], mirror: World) -> tuple[Any, ...]:
    """``action`` with its request swapped, as the mirror world offers it."""
    if action[0] in ("deliver", "duplicate"):
        order = status_order(action[1])
        if order[0] < 3:
            order = (order[0], 1 - order[1], *order[2:])
        (status,) = {s for s in mirror.transport.statuses if status_order(s) == order}
        return (action[0], status)
    if len(action) > 1 and type(action[1]) is int:
        return (action[0], 1 - action[1], *action[2:])
    return action


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_run_and_its_mirror_are_mirrored_states(data: st.DataObject) -> None:
    """Swapping two requests of equal totals in every action gives the state with the two
    swapped (what the explorer's folding relies on; fails if the code ever orders or picks
    requests by id), and where a request is under way both have one key."""
    harness = Harness(ALL_FAULTS, strategy("epoch"))
    w, m = harness.initial_world((2, 2)), harness.initial_world((2, 2))
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        actions = harness.actions(w, w.snapshot())
        if not actions:
            break
        action = data.draw(st.sampled_from(actions), label="action")
        mirror = _mirrored(action, m)
        assert mirror in harness.actions(m, m.snapshot())
        harness.apply(w, action)
        harness.apply(m, mirror)
        s, t = w.snapshot(), m.snapshot()
        assert renamed(key(s), (1, 0)) == key(t)
        if any(not r.state.terminal for r in s.receiver.records):
            assert harness.key(s) == harness.key(t)


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("abort", [False, True])
def test_a_mixed_batch_and_its_mirror_are_mirrored_states(first: int, abort: bool) -> None:
    """The walks above seldom batch both requests' statuses together: here every batch does."""
    harness = Harness(ALL_FAULTS, strategy("epoch"))
    w, m = harness.initial_world((2, 2)), harness.initial_world((2, 2))

    def both(action: tuple[Any, ...]) -> None:
        assert action in harness.actions(w, w.snapshot())
        harness.apply(w, action)
        harness.apply(m, _mirrored(action, m))
        s = w.snapshot()
        assert renamed(key(s), (1, 0)) == key(m.snapshot())
        if any(not r.state.terminal for r in s.receiver.records):
            assert harness.key(s) == harness.key(m.snapshot())

    for action in [("encode", 0), ("encode", 1), ("add", first), ("add", 1 - first)]:
        both(action)
    batches = 0
    for _ in range(12):
        names = {a[0] for a in harness.actions(w, w.snapshot())}
        if len({s.rid for s in w.transport.statuses}) > 1 and "deliver-all" in names:
            both(("deliver-all",))
            batches += 1
            if abort and batches == 1 and ("abort", first) in harness.actions(w, w.snapshot()):
                both(("abort", first))
        elif "step" in names:
            both(("step",))
        elif "send" in names:
            both(("send",))
    assert batches


def test_the_folded_states_are_the_mirrors_of_the_kept_ones() -> None:
    """(2, 1) explores exactly as many states as (1, 2), its mirror, which is why only one
    is a partition; with the reductions on, fewer states and the same verdict."""
    bounds = QUICK_BOUNDS
    epoch = strategy("epoch")
    assert (1, 2) in partitions(bounds, epoch) and (2, 1) not in partitions(bounds, epoch)
    for reductions in (False, True):
        one, other = (
            explore_partition(bounds, epoch, t, reductions=reductions) for t in ((1, 2), (2, 1))
        )
        assert (one.states, one.transitions, one.done_states) == (
            other.states,
            other.transitions,
            other.done_states,
        ), reductions
    off, on = explore(bounds, epoch, reductions=False), explore(bounds, epoch)
    assert off.complete and on.complete
    assert off.states == 30_075  # the count before the reductions (and verify --quick's lifo)
    assert on.states < off.states * 0.6


def test_a_batch_is_handed_over_in_the_order_of_the_live_records() -> None:
    """Not in id order (the mirror of a run would not be a run): the request added first
    has its statuses taken first, whichever id it has."""
    harness = Harness(ADVERSARY_BOUNDS["forged and poisoned"], strategy("epoch"))
    w = harness.initial_world((1, 1))
    for action in [("add", 1), ("add", 0), ("step",), ("step",), ("send",), ("send",)]:
        harness.apply(w, action)
    assert {s.rid for s in w.transport.statuses} == {0, 1}
    order = batch_order(w.receiver.snapshot())
    assert [s.rid for s in sorted(w.transport.statuses, key=order)] == [1, 0]


@pytest.mark.parametrize("name", ["seed-index", "no-dedup", "sent-tokens"])
def test_a_broken_design_is_still_caught_with_the_symmetry_folded(name: str) -> None:
    for reductions in (False, True):
        run = explore(QUICK_BOUNDS, strategy(name), first_only=True, reductions=reductions)
        assert run.violation is not None, (name, reductions)
