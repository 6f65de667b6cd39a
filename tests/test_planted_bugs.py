"""The explorer checks the code that runs: every kind of bug planted in it is caught."""

from __future__ import annotations

import pytest
from planted_bugs import BOUNDS, BUGS, FUZZER_BUGS, bounds_for

from resumekit.properties.explorer import explore
from resumekit.properties.fuzz import fuzz
from resumekit.properties.invariants import CRASH, INVARIANTS, NO_LEAK
from resumekit.properties.planting import Bug, planted
from resumekit.properties.strategies import strategy


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: b.name.replace(" ", "-"))
def test_planted_bug_is_caught_by_the_explorer(bug: Bug) -> None:
    bounds = bounds_for(bug)
    with planted(bug):
        run = explore(bounds, strategy("epoch"), workers=1)
    assert run.violation is not None, f"the explorer missed: {bug}"
    assert run.violation.invariant in (*INVARIANTS, CRASH)
    assert not run.complete


def test_the_clean_code_passes_the_same_bounds() -> None:
    """Each catch means something: unplanted, the code passes (the adversary sets are
    proven in test_reference_strategies)."""
    run = explore(BOUNDS["small"], strategy("epoch"))
    assert run.complete and run.violation is None, run.violation and run.violation.format()


def test_a_bug_that_does_not_apply_is_refused() -> None:
    bug = BUGS[0]
    stale = Bug(bug.name, bug.owner, bug.method, "text that is not there", "x")
    with pytest.raises(ValueError, match="occurs 0 times"), planted(stale):
        pass
    assert bug.owner.__dict__[bug.method] is not None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("a round the sender refused goes to quarantine, not back to the pool", "refusal of it"),
        ("a lost peer keeps the quarantine", "after the peer was lost"),
    ],
)
def test_a_needless_quarantine_is_named_at_the_step_that_made_it(name: str, says: str) -> None:
    """Both halves of the quarantine check fire on their own bug, before a leak would."""
    bug = next(b for b in BUGS if b.name == name)
    with planted(bug):
        run = explore(bounds_for(bug), strategy("epoch"), workers=1)
    assert run.violation is not None
    assert run.violation.invariant == NO_LEAK
    assert says in run.violation.detail, run.violation.detail


#: The bugs of combined faults, of the pool's order and of what each step accounts for
#: (issue 23), and of the scheduling policy (issue 21), which the fuzzer must catch too: it
#: draws the same combinations, forgeries and policies and checks the same invariants.
FUZZED = (
    "a Cancel is served before it is checked",
    "a Cancel that names no round is answered with a status",
    "a Cancel names the round in flight though it was not quarantined",
    "a status of a finished request is dropped uncounted",
    "a malformed status with an unhashable id raises out of the receiver's step",
    "a malformed post with an unhashable id raises out of the sender's step",
    "a new sender's PeerBack does not clear the loss",
    "round 0's final flag is not checked",
    "a later round's final flag is not checked",
    "a refusal of the round in flight fails the request without cancelling it",
    "round 0's total is taken from its status, not checked against its aux row",
    "a request added after the peer is lost is cancelled twice",
    "a taken result counts its consumed rounds down",
    "the sender serves a post that expects more tokens than its round carries",
    "a resume that is not bulk is cut to a bulk round's size",
    "a resume's post does not say how many tokens its round carries",
    "a malformed status of an earlier life fails the current one",
    "only the epoch of a status is type-checked",
    "a newly waiting resume jumps the queue",
    "an early post passes a waiting resume",
    "the window is not checked before a waiting round is served",
    "a bulk early post passes a waiting bulk resume",
    "a bulk resume is passed over without end",
    "admissions that pass a bulk resume are not counted",
    "no request is ever bulk",
    "a landed round's next round queues instead of overlapping the copy-out",
    "a waiting resume under a policy is left with one block free",
    "a yielding round is posted while another is in flight",
    "a malformed status fails no request",
    "an orphan status resets the orphan count",
    "a refusal of the round before fails the request",
    "a finished request is reported under no id",
    "an aborted request is never reported",
    "a stale post is counted twice",
    "a malformed post is refused without a reason",
    "the sender serves a post that resumes where it did not stop",
    "a round the sender refused goes to quarantine, not back to the pool",
)


@pytest.mark.parametrize("name", [*FUZZED, *(b.name for b in FUZZER_BUGS)])
def test_the_fuzzer_catches_combined_faults_and_the_pools_order(name: str) -> None:
    bug = next(b for b in [*BUGS, *FUZZER_BUGS] if b.name == name)
    with planted(bug):
        result = fuzz("epoch", max_examples=600, database=None, shrink=False)
    assert result.failed, f"the fuzzer missed: {bug}"
    assert result.invariant in (*INVARIANTS, CRASH)
