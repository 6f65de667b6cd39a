"""What ``resumekit verify --quick`` checks, one test per check, cheapest first.

A mutation run (``mutmut run``, see the README) applies these with the protocol
tests to every mutant of the receiver, sender, round filter and allocator; split
into tests, each mutant stops at the first check that fails.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from resumekit.properties.bounds import QUICK_BOUNDS, bounds_sets
from resumekit.properties.explorer import explore
from resumekit.properties.fuzz import fuzz
from resumekit.properties.strategies import BROKEN, strategy
from resumekit.properties.verify import QUICK_EXAMPLES

# Cheapest first: a mutant stops at the first check that fails.
COST = {"squeezed pool": 1, "late sources": 2, "forged and poisoned": 3, "quick": 4}
SETS = sorted(bounds_sets(quick=True), key=lambda item: COST.get(item[0], 5))


def test_epoch_survives_the_fuzzer() -> None:
    result = fuzz("epoch", max_examples=QUICK_EXAMPLES, database=None)
    assert not result.failed, result.format()


@pytest.mark.parametrize(("name", "bounds"), SETS, ids=[n.replace(" ", "-") for n, _ in SETS])
def test_epoch_holds(name: str, bounds: object) -> None:
    orders = ("lifo", "fifo") if name == "quick" else ("lifo",)
    for order in orders:
        run = explore(replace(bounds, reuse=order), strategy("epoch"), workers=1)  # type: ignore[type-var]
        assert run.violation is None, run.violation.format()
        assert run.complete


@pytest.mark.parametrize("name", BROKEN)
def test_broken_design_is_caught(name: str) -> None:
    run = explore(QUICK_BOUNDS, strategy(name), first_only=True, workers=1)
    assert run.violation is not None
    assert fuzz(name, max_examples=400, database=None).failed
