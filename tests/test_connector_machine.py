"""The vLLM connector's machine can fail: each of its properties catches a bug planted in
the connector's bookkeeping (the shipped code with one small textual change)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from resumekit.errors import ResumeKitError
from resumekit.integrations.vllm.book import ConsumerBook, ProducerBook
from resumekit.integrations.vllm.rank import ConsumerRank
from resumekit.properties.connector_machine import ConnectorMachine
from resumekit.properties.invariants import (
    CRASH,
    EXACTLY_ONCE,
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    InvariantViolation,
)
from resumekit.properties.planting import Bug, planted

SETTINGS = settings(
    max_examples=600,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)

BUGS = [
    (
        Bug(
            "an item is available once the first rank has it",
            ConsumerBook,
            "_landed",
            "if len(item.ranks) < self.ranks:",
            "if len(item.ranks) < 1:",
        ),
        EXACTLY_ONCE,
    ),
    (
        Bug(
            "a second request for an item lands it again",
            ConsumerBook,
            "_register",
            "            if item is None:\n",
            "            if True:\n",
        ),
        CRASH,  # the ranks refuse to land an id twice at once
    ),
    (
        Bug(
            "a finished request's items are not released",
            ConsumerBook,
            "finished",
            "            if not item.requests:\n                self._release(item)",
            "            if False:\n                self._release(item)",
        ),
        NO_LEAK,
    ),
    (
        Bug(
            "a failure on one rank fails only the first request needing the item",
            ConsumerBook,
            "_fail",
            "            if need.failed is None:",
            "            if need.failed is None and not self.unavailable:",
        ),
        LIVENESS,
    ),
    (
        Bug(
            "a failed item is not released on the other ranks",
            ConsumerBook,
            "_fail",
            "        self.orders.release.append(rid)\n",
            "",
        ),
        NO_LEAK,
    ),
    (
        Bug(
            "a rank loads another item's tensor",
            ConsumerRank,
            "apply",
            "            encoder_cache[identifier] = self.whole[rid]",
            "            encoder_cache[identifier] = next(iter(self.whole.values()))",
        ),
        INTEGRITY,
    ),
    (
        Bug(
            "the encode side sends a transfer twice",
            ProducerBook,
            "want",
            "                if rid in self.sent:\n                    continue\n",
            "",
        ),
        NO_LEAK,
    ),
]


def test_the_connector_machine_passes_on_the_shipped_code() -> None:
    run_state_machine_as_test(ConnectorMachine, settings=SETTINGS)


@pytest.mark.parametrize(("bug", "invariant"), BUGS, ids=[b.name for b, _ in BUGS])
def test_each_property_catches_a_planted_bug(bug: Bug, invariant: str) -> None:
    with planted(bug), pytest.raises((InvariantViolation, ResumeKitError)) as caught:
        run_state_machine_as_test(ConnectorMachine, settings=SETTINGS)
    found = caught.value.invariant if isinstance(caught.value, InvariantViolation) else CRASH
    assert found == invariant, caught.value
