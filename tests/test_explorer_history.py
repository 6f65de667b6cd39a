"""The explorer's verdict and state count do not depend on what ran before in the process.

A poisoned status can compare equal to a well-formed one (``final=1 == final=True``,
with equal hashes). The status-order cache was keyed by the status, so whichever of the
two the process met first named both: states that differ were merged, and which one's
future was explored depended on what the process had keyed before (verify counted
1,368,831 states after the planted-bug tests, 1,363,299 alone). The explorer's actions
and the fuzzer's deliveries also told the two apart by ``==`` (one delivery for both,
and the wrong one taken out of flight).
"""

from __future__ import annotations

from dataclasses import replace

from resumekit.properties import abstraction
from resumekit.properties.bounds import Bounds, bounds_sets
from resumekit.properties.explorer import explore
from resumekit.properties.model import Harness
from resumekit.properties.strategies import strategy
from resumekit.protocol import messages as msg

GOOD = msg.Landed(0, 0, 1, 2, True, incarnation=1)
TWIN = msg.Landed(0, 0, 1, 2, 1, incarnation=1)  # poisoned final: == GOOD, same hash


def test_twins_compare_equal() -> None:
    """The premise: without it the cache could not confuse them."""
    assert GOOD == TWIN and hash(GOOD) == hash(TWIN)
    assert msg.malformed_status(TWIN) is not None


def test_a_status_keeps_its_own_order_whatever_was_keyed_first() -> None:
    abstraction._ORDERS.clear()
    first = abstraction._status_key(GOOD, {})
    twin = abstraction._status_key(TWIN, {})
    assert twin != first
    abstraction._ORDERS.clear()
    assert abstraction._status_key(TWIN, {}) == twin  # the same alone as after GOOD


def _world_with(statuses: tuple[msg.Status, ...]) -> tuple[Harness, object]:
    harness = Harness(Bounds(blocks=3, requests=1, max_rounds=2), strategy("epoch"))
    (totals,) = list(harness.initial_totals())[-1:]
    w = harness.initial_world(totals)
    w.transport.statuses = statuses
    return harness, w


def test_each_twin_gets_its_own_delivery() -> None:
    harness, w = _world_with((GOOD, TWIN))
    delivered = [a[1] for a in harness.actions(w, w.snapshot()) if a[0] == "deliver"]  # type: ignore[arg-type,attr-defined]
    assert len(delivered) == 2
    assert {repr(s.final) for s in delivered} == {"True", "1"}


def test_delivering_the_twin_takes_the_twin() -> None:
    harness, w = _world_with((GOOD, TWIN))
    harness.apply(w, ("deliver", TWIN))  # type: ignore[arg-type]
    assert [repr(s.final) for s in w.transport.statuses] == ["True"]  # type: ignore[attr-defined]


def test_the_state_count_is_the_same_whatever_the_cache_held() -> None:
    """The cache is cleared when full: where in an exploration that falls (after what
    the process keyed before) must not change what is explored."""
    bounds = replace(dict(bounds_sets())["forged and poisoned"], reuse="lifo")
    abstraction._ORDERS.clear()
    alone = explore(bounds, strategy("epoch"), workers=1).states
    counts = set()
    for held in (64_000, 65_000, 65_400):
        abstraction._ORDERS.clear()
        for i in range(held):  # what earlier explorations in this process left
            abstraction._status_key(msg.Cancelled(("earlier", i), 0, incarnation=1), {})
        counts.add(explore(bounds, strategy("epoch"), workers=1).states)
    assert counts == {alone}
