"""A bug that breaks building or restoring the shipped objects gets a verdict (FAIL with a
finding), never an error that stops verify (a mutation sample's exit 2s)."""

from __future__ import annotations

from resumekit.allocator import block_allocator as allocator_module
from resumekit.properties.bounds import QUICK_BOUNDS
from resumekit.properties.contracts import check_contracts
from resumekit.properties.explorer import explore, explore_partition
from resumekit.properties.invariants import CRASH
from resumekit.properties.planting import Bug, planted
from resumekit.properties.strategies import strategy
from resumekit.protocol import receiver as receiver_module
from resumekit.protocol import sender as sender_module

#: A snapshot that loses the source's total: only objects restored from it fail.
FROZEN_WITHOUT_TOTAL = Bug(
    "a source's snapshot drops its total",
    sender_module._Source,
    "frozen",
    "self.sent, self.total",
    "self.sent, None",
)
#: The receiver refuses its own snapshot, so the explorer's world cannot be primed.
REFUSES_OWN_SNAPSHOT = Bug(
    "the receiver refuses its own snapshot",
    receiver_module.ResumableReceiver,
    "restore",
    "(snapshot.sizer is None) != (self.sizer is None)",
    "(snapshot.sizer is None) != (self.sizer is not None)",
)


def test_a_violation_only_restored_objects_show_is_a_crash_with_its_trace() -> None:
    with planted(FROZEN_WITHOUT_TOTAL):
        run = explore(QUICK_BOUNDS, strategy("epoch"), workers=1, first_only=True)
    assert run.violation is not None and not run.complete
    assert run.violation.invariant == CRASH
    assert "restored from their own snapshots" in run.violation.detail
    assert run.violation.actions  # the trace, replayed restoring each state


def test_an_initial_world_that_cannot_be_built_is_a_finding() -> None:
    with planted(REFUSES_OWN_SNAPSHOT):
        run = explore(QUICK_BOUNDS, strategy("epoch"), workers=1, first_only=True)
        report = check_contracts()
    assert run.violation is not None and run.violation.invariant == CRASH
    assert "initial world cannot be built" in run.violation.detail
    assert not run.complete and run.states == 0
    assert not report.ok  # restore's contracts see it too


def test_a_contracts_world_that_cannot_be_built_is_a_broken_contract() -> None:
    bug = Bug(
        "the receiver refuses every buffers object",
        receiver_module.ResumableReceiver,
        "__init__",
        'check_interface(buffers, "buffers"',
        'check_interface(None, "buffers"',
    )
    with planted(bug):
        report = check_contracts()
    assert not report.ok and report.cases > 100
    assert report.broken[0][0] == "a fresh world" and "buffers" in report.broken[0][1]


def test_a_state_restore_refuses_on_its_second_restore_is_a_finding() -> None:
    """The first restore of the initial state is skipped (the allocator holds that very
    snapshot); the one before the second action is not, and it raised out of verify."""
    bug = Bug(
        "the allocator's snapshot names no pool",
        allocator_module.BlockAllocator,
        "snapshot",
        "self._pool_id, free,",
        "None, free,",
    )
    with planted(bug):
        run = explore(QUICK_BOUNDS, strategy("epoch"), workers=1, first_only=True)
    assert run.violation is not None and run.violation.invariant == CRASH
    assert "cannot be restored" in run.violation.detail
    assert "another allocator" in run.violation.detail


def test_a_done_state_whose_objects_raise_when_asked_is_a_finding() -> None:
    """The checks at a done state ask the sender what it holds; a sender that raises
    there is a crash with its trace, not an error out of verify (mutant ``__len___4``)."""
    bug = Bug(
        "the sender cannot count what it holds",
        sender_module.EmbeddingSender,
        "__len__",
        "sum(map(len, self._lives.values()))",
        "sum(map(self._lives.values()))",
    )
    with planted(bug):
        run = explore(QUICK_BOUNDS, strategy("epoch"), workers=1, first_only=True)
    assert run.violation is not None and not run.complete
    assert run.violation.invariant == CRASH
    assert "cannot be judged" in run.violation.detail
    assert run.violation.actions


def test_a_snapshot_that_raises_is_a_broken_contract() -> None:
    bug = Bug(
        "the receiver's snapshot has no sizing",
        receiver_module.ResumableReceiver,
        "snapshot",
        "None if self.sizer is None else self.sizer.snapshot()",
        "None if self.sizer is not None else self.sizer.snapshot()",
    )
    with planted(bug):
        report = check_contracts()
    assert not report.ok
    assert any("snapshot raised" in why for _, why in report.broken)


def test_a_done_problem_only_restored_objects_show_is_a_crash_with_its_trace() -> None:
    """A receiver record's snapshot that loses the total: the problem is seen at a done
    state, whose trace replayed on fresh objects goes elsewhere (and cannot be worded);
    it raised out of verify (mutant ``RequestRecord.frozen__mutmut_7``), now this finding."""
    bug = Bug(
        "a record's snapshot drops its total",
        receiver_module.RequestRecord,
        "frozen",
        "            self.total,\n",
        "            None,\n",
    )
    with planted(bug):
        run = explore_partition(QUICK_BOUNDS, strategy("epoch"), (2, 2))
    assert run.violation is not None and not run.complete
    assert run.violation.invariant == CRASH
    assert "restored from their own snapshots" in run.violation.detail
    assert "though no abort or crash touched it" in run.violation.detail  # judged when done
    assert len(run.violation.actions) >= 2


def test_a_trace_that_replays_neither_way_is_a_finding_with_its_actions() -> None:
    """A receiver whose restore keeps its lost peer leaks the loss of one explored state
    into the next: the trace found replays neither on fresh objects nor restoring each
    state. It raised ReplayDiverged out of verify; now it is a crash naming why."""
    bug = Bug(
        "restore keeps the receiver's loss",
        receiver_module.ResumableReceiver,
        "restore",
        "        self.peer_lost = snapshot.peer_lost\n",
        "        pass\n",
    )
    with planted(bug):
        run = explore_partition(QUICK_BOUNDS, strategy("epoch"), (1, 1))
    assert run.violation is not None and run.violation.invariant == CRASH
    assert "replays neither on fresh objects nor restoring" in run.violation.detail
    assert run.violation.actions  # as found
