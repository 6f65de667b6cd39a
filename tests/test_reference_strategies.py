"""The suite must be able to fail: both checkers catch each replaced design, never epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from resumekit.properties.bounds import STANDARD_BOUNDS, Bounds
from resumekit.properties.explorer import explore
from resumekit.properties.fuzz import fuzz
from resumekit.properties.invariants import INVARIANTS, LIVENESS, NO_WRITE_AFTER_FREE
from resumekit.properties.protocol_machine import protocol_machine
from resumekit.properties.strategies import BROKEN, strategy
from resumekit.protocol import ResumableReceiver

MAX_TRACE = 20


@pytest.mark.parametrize("name", BROKEN)
def test_explorer_catches(name: str) -> None:
    run = explore(STANDARD_BOUNDS, strategy(name), first_only=True)
    assert run.violation is not None, f"the explorer missed {name}"
    assert run.violation.invariant in INVARIANTS
    assert 0 < len(run.violation.actions) < MAX_TRACE
    assert not run.complete


@pytest.mark.parametrize("name", BROKEN)
def test_fuzzer_catches(name: str, tmp_path: Path) -> None:
    result = fuzz(name, max_examples=400, database=tmp_path)
    assert result.failed, f"the fuzzer missed {name} in {result.examples} examples"
    assert result.invariant in INVARIANTS, result.detail
    assert 0 < len(result.actions) < MAX_TRACE
    assert result.replay_command == f"resumekit fuzz --strategy {name} --replay {tmp_path}"


def test_the_same_seed_finds_the_same_thing() -> None:
    """Budgets in examples and fixed seeds: a verdict does not depend on the machine."""
    first = fuzz("seed-index", max_examples=400, start_seed=3, database=None)
    again = fuzz("seed-index", max_examples=400, start_seed=3, database=None)
    assert first.failed and again.failed
    assert (first.invariant, first.detail, first.actions, first.examples) == (
        again.invariant,
        again.detail,
        again.actions,
        again.examples,
    )


def test_explorer_proves_epoch_on_a_small_pool() -> None:
    """The standard and adversary bounds are proven by ``resumekit verify`` (test_cli)."""
    run = explore(Bounds(blocks=4, requests=2, max_rounds=3), strategy("epoch"))
    assert run.violation is None, run.violation and run.violation.format()
    assert run.complete and run.states > 10_000 and run.done_states > 0


def test_explorer_proves_epoch_with_three_requests() -> None:
    bounds = Bounds(
        blocks=3, requests=3, max_rounds=2, duplicates=0, aborts=1, crashes=1, pressure=0
    )
    run = explore(bounds, strategy("epoch"))
    assert run.complete and run.violation is None


def test_a_capped_exploration_is_not_complete() -> None:
    run = explore(STANDARD_BOUNDS, strategy("epoch"), max_states=500)
    assert not run.complete and run.violation is None
    late = explore(STANDARD_BOUNDS, strategy("epoch"), deadline=0.0)
    assert late.capped and not late.complete and late.states == 0


def test_the_fuzzer_makes_resumes_wait_for_blocks() -> None:
    """The pool's other user grabs what a consumed round frees: the resume has to wait."""
    machine = protocol_machine("epoch")
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=300,
            stateful_step_count=50,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert machine.resume_waits > 0


def test_fuzzer_finds_nothing_in_epoch() -> None:
    result = fuzz("epoch", max_examples=150, database=None)
    assert not result.failed, result.format()
    assert result.examples >= 150


def test_seed_index_hangs_without_any_fault() -> None:
    """The design note's own scenario: the resume lands in the same blocks and is skipped."""
    # A pool that holds one round: the resume can only reuse the landed round's block.
    faultless = Bounds(
        blocks=1, requests=1, max_rounds=3, duplicates=0, aborts=0, crashes=0, pressure=0
    )
    run = explore(faultless, strategy("seed-index"))
    assert run.violation is not None and run.violation.invariant == LIVENESS
    assert "no terminal state is reachable" in run.violation.detail
    text = run.violation.format()
    assert text.count("into blocks [0]") >= 2, text  # two rounds, the very same block
    for name in ("no-dedup", "sent-tokens", "epoch"):
        assert explore(faultless, strategy(name)).complete


def test_planted_bug_in_the_real_receiver_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing an aborted request's in-flight round (no quarantine) lets the sender write
    into blocks already back in the pool: the protocol machine must see it."""
    original = ResumableReceiver._fail

    def no_quarantine(self: ResumableReceiver, req, reason, *, peer_alive, written=True):  # type: ignore[no-untyped-def]
        original(self, req, reason, peer_alive=peer_alive, written=False)

    monkeypatch.setattr(ResumableReceiver, "_fail", no_quarantine)
    result = fuzz("epoch", max_examples=600, database=None)
    assert result.failed
    assert result.invariant == NO_WRITE_AFTER_FREE, result.format()


@pytest.mark.parametrize("name", ["epoch", "seed-index", "sent-tokens"])
def test_a_world_restored_from_a_state_runs_as_the_one_that_made_it(name: str) -> None:
    """The explorer keeps states and restores its world into each: an action taken from
    a restored state must give what it gave from the state as the code left it (nothing
    lost or healed by snapshot and restore), over random walks through every action."""
    import random

    from resumekit.properties.model import Harness

    bounds = Bounds(blocks=3, requests=2, max_rounds=3, forgeries=1, poisons=1, reuses=1)
    harness = Harness(bounds, strategy(name))
    rng = random.Random(7)
    kinds: set[str] = set()
    for totals in harness.initial_totals():
        w = harness.initial_world(totals)
        state = w.snapshot()
        for _ in range(40):
            actions = harness.actions(w, state)
            if not actions:
                break
            action = rng.choice(actions)
            kinds.add(action[0])
            outcomes = []
            for _again in range(2):  # as the code left it, then restored
                try:
                    harness.apply(w, action)
                    outcomes.append(harness.key(w.snapshot()))
                except Exception as error:
                    outcomes.append(type(error))
                w.restore(state)
            assert outcomes[0] == outcomes[1], action
            if isinstance(outcomes[0], type):
                break
            harness.apply(w, action)
            state = w.snapshot()
    assert {"add", "deliver", "send", "forge", "poison"} <= kinds
