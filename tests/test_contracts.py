"""The contracts ``resumekit verify`` checks: they pass on the shipped code, and each kind
of contract catches a bug planted against it."""

from __future__ import annotations

import pytest

from resumekit.allocator.block_allocator import BlockAllocator
from resumekit.properties.contracts import CASES, GOOD, ContractReport, check_contracts
from resumekit.properties.planting import Bug, planted
from resumekit.properties.verify import StrategyReport, Verdict, VerifyReport
from resumekit.protocol.receiver import ResumableReceiver
from resumekit.protocol.sender import EmbeddingSender


def test_the_shipped_code_keeps_every_contract() -> None:
    report = check_contracts()
    assert report.ok, report.broken
    assert report.cases == len(CASES) + len(GOOD) + 1 > 100


BROKEN = [
    (  # a bad value accepted
        Bug(
            "allocate takes 0 tokens",
            BlockAllocator,
            "allocate",
            'as_int(num_tokens, "num_tokens", minimum=1)',
            'as_int(num_tokens, "num_tokens")',
        ),
        "allocate 0 tokens",
    ),
    (  # refused, but the message names nothing
        Bug(
            "the incarnation is not named",
            EmbeddingSender,
            "add",
            'as_int(incarnation, "incarnation", minimum=1)',
            'as_int(incarnation, "value", minimum=1)',
        ),
        "sender add incarnation 0",
    ),
    (  # a good value's documented result
        Bug(
            "free_owner counts one for nothing",
            BlockAllocator,
            "free_owner",
            "return 0",
            "return 1",
        ),
        "free_owner of an owner holding nothing",
    ),
    (  # a snapshot that is not one gets past restore's check
        Bug(
            "restore lets a record of no state through",
            ResumableReceiver,
            "restore",
            "if not isinstance(state, RecordState) or not",
            "if not isinstance(state, RecordState) and not",
        ),
        "receiver restore a record of no state",
    ),
]


@pytest.mark.parametrize(("bug", "case"), BROKEN, ids=[b.name for b, _ in BROKEN])
def test_a_planted_bug_breaks_its_contract(bug: Bug, case: str) -> None:
    with planted(bug):
        report = check_contracts()
    assert case in dict(report.broken), report.broken
    assert not report.ok


def test_verify_fails_when_a_contract_breaks_or_none_ran() -> None:
    broken = ContractReport(112, (("x", "accepted the bad value"),))
    assert VerifyReport([], 1, 1, None, contracts=broken).verdict is Verdict.FAIL
    assert VerifyReport([], 1, 1, None, contracts=None).verdict is Verdict.FAIL
    assert not ContractReport(0, ()).ok  # checking nothing is no pass
    # Nor is an epoch that explored and fuzzed nothing.
    assert StrategyReport("epoch").verdict == "INCONCLUSIVE"
