"""The checkers live apart from what they check, declare each fact once, and say what
they explored: the shipped classes carry no plumbing of theirs."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from resumekit import BlockAllocator, BlockBuffers, EmbeddingSender, InProcessTransport
from resumekit.cli import build_parser
from resumekit.properties.bounds import (
    ADVERSARY_BOUNDS,
    AHEAD,
    BUDGETED,
    FAULTS,
    POISONED_POST,
    QUICK_BOUNDS,
    STANDARD_BOUNDS,
    Bounds,
    bounds_sets,
    describe,
    with_faults,
)
from resumekit.properties.explorer import (
    ReplayDiverged,
    explore,
    explore_partition,
    partitions,
    replay,
)
from resumekit.properties.model import Harness
from resumekit.properties.strategies import STRATEGIES, strategy
from resumekit.properties.verify import VerifyReport, format_report
from resumekit.protocol import ResumableReceiver, RoundPost

ROOT = Path(__file__).resolve().parent.parent / "resumekit"


def test_quick_verify_prints_the_bounds_it_explored() -> None:
    """It used to print the standard bounds under 'bounds explored' after a quick run."""
    quick = format_report(VerifyReport([], 1, 1, None, quick=True))
    assert f"  quick: {describe(QUICK_BOUNDS)}" in quick
    assert "standard:" not in quick and "the broken designs under quick" in quick
    full = format_report(VerifyReport([], 1, 1, None, quick=False))
    assert f"  standard: {describe(STANDARD_BOUNDS)}" in full and "  quick:" not in full


def test_a_replay_that_diverges_says_so_instead_of_stopping_short() -> None:
    """replay swallowed any exception, so a diverging trace printed silently truncated."""
    harness = Harness(Bounds(blocks=2, requests=1, max_rounds=1), strategy("epoch"))
    totals = next(harness.initial_totals())
    fine = [("add", 0), ("step",)]
    assert len(replay(harness, totals, fine)) == 2
    with pytest.raises(ReplayDiverged, match="action 1 of 3"):
        replay(harness, totals, [("no such action",), *fine])
    with pytest.raises(ReplayDiverged, match="not when replayed"):
        replay(harness, totals, fine, raises_at_end=True)
    lines = replay(harness, totals, [*fine, ("no such action",)], raises_at_end=True)
    assert len(lines) == 3  # the action that broke something is the last line


def test_the_shipped_receiver_and_sender_carry_no_reference_design() -> None:
    source = "\n".join(
        (ROOT / "protocol" / name).read_text() for name in ("receiver.py", "sender.py")
    )
    for plumbing in ("round_filter", "memo", "Observation", "AUX_PROGRESS", "marker"):
        assert plumbing not in source, plumbing
    assert "round_filter" not in inspect.signature(ResumableReceiver).parameters
    for name, design in STRATEGIES.items():
        receiver = design.receiver
        if name == "epoch":
            assert receiver is ResumableReceiver
        else:
            assert receiver.__module__ == "resumekit.properties.strategies"
            assert issubclass(receiver, ResumableReceiver)
            assert receiver._classify is not ResumableReceiver._classify


def test_the_sender_writes_only_what_the_receiver_reads() -> None:
    """The progress marker was written into every round's aux row for the sent-tokens
    design alone; now round 0 carries (total, mRoPE delta) and later rounds nothing."""
    rows: list[object] = []

    class Spy(InProcessTransport):
        def write_round(self, post: RoundPost, data: object, aux: object) -> None:
            rows.append(aux)
            super().write_round(post, data, aux)  # type: ignore[arg-type]

    allocator = BlockAllocator(4, 2)
    buffers = BlockBuffers(allocator, 2, device="cpu")
    t = Spy(buffers)
    receiver, sender = ResumableReceiver(buffers, t, 2), EmbeddingSender(t)
    receiver.add("r")
    sender.add("r", buffers.new_output(5), mrope_delta=7)
    for _ in range(12):
        receiver.step()
        sender.step()
    assert rows == [(5, 7), None]  # 2 tokens, then the 3 left
    assert receiver.take("r").ok


def test_each_fault_kind_is_declared_once_and_used_everywhere() -> None:
    budget_fields = {f.field for f in BUDGETED}
    switches = {f.field for f in FAULTS if f.switch}
    bounds_fields = set(Bounds.__dataclass_fields__)
    assert budget_fields | switches <= bounds_fields
    assert len({f.name for f in FAULTS}) == len(FAULTS) == len({f.field for f in FAULTS})
    assert Bounds().budget == tuple(getattr(Bounds(), f.field) for f in BUDGETED)
    # The CLI takes exactly these names, and verify prints their words.
    check = build_parser().parse_args(["check", "--faults", ",".join(f.name for f in FAULTS)])
    assert check.faults == {f.name for f in FAULTS}
    everything = with_faults(Bounds(blocks=8), {f.name for f in FAULTS})
    assert all(f.words in describe(everything) for f in FAULTS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["check", "--faults", "duplicate,meteor"])
    assert next(name for name, _ in bounds_sets()) == "standard"


_ROLE = re.compile(r":(?:mod|class|func|meth|data|attr):`~?([A-Za-z_][\w.]*)`")


def _resolves(module: object, dotted: str) -> bool:
    if dotted.startswith("resumekit."):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] == "vllm":
                    return True  # the vLLM connector, where vLLM is not installed
                continue
            except ImportError:
                continue
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
        return False
    obj = module
    for attr in dotted.split("."):
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def _docstrings(tree: ast.Module) -> list[tuple[list[str], str]]:
    """Every docstring, with the classes it sits in (a method's ``:meth:`x``` is its class's)."""
    found: list[tuple[list[str], str]] = [([], ast.get_docstring(tree) or "")]

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [*scope, child.name] if isinstance(child, ast.ClassDef) else scope
                found.append((inner, ast.get_docstring(child) or ""))
                visit(child, inner)

    visit(tree, [])
    return found


def test_every_reference_in_a_docstring_names_something_that_exists() -> None:
    """Docstrings described code that no longer existed (``Harness.initial_worlds``)."""
    stale = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name.endswith("__main__"):
            continue  # running it runs the CLI
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == "vllm" or (error.name or "").startswith("vllm."):
                continue  # the vLLM connector, where vLLM is not installed
            raise
        for scope, doc in _docstrings(ast.parse(path.read_text())):
            places = [".".join(scope[:k]) for k in range(len(scope), 0, -1)]
            for ref in _ROLE.findall(doc):
                if not any(_resolves(module, f"{p}.{ref}") for p in places) and not _resolves(
                    module, ref
                ):
                    stale.append(f"{name}: {ref}")
    assert stale == []
    assert not _resolves(torch, "no_such_thing") and _resolves(torch, "Tensor")


def test_a_corrupted_post_never_overtakes_a_queued_cancel() -> None:
    """``check --faults all`` (2 blocks, 1 request, 1 round, lifo) reported a leak on the
    shipped design: the poisoned post of life 2 reached the sender ahead of life 1's queued
    cancel, which no transport does (posts keep their order)."""
    harness = Harness(
        with_faults(
            Bounds(blocks=2, requests=1, max_rounds=1, reuse="lifo"), {f.name for f in FAULTS}
        ),
        strategy("epoch"),
    )
    w = harness.initial_world(next(harness.initial_totals()))
    for action in [("add", 0), ("abort", 0), ("reuse", 0), ("add", 0), ("encode", 0)]:
        assert action in harness.actions(w, w.snapshot())
        harness.apply(w, action)
    assert w.transport.posts  # life 1's cancel is still in flight
    assert not [a for a in harness.actions(w, w.snapshot()) if a[0] == "poison-post"]
    while w.transport.posts:
        harness.apply(w, ("send",))
    posts = [a for a in harness.actions(w, w.snapshot()) if a[0] == "poison-post"]
    assert posts == [("poison-post", 0, field) for field in (*POISONED_POST, AHEAD)]


@pytest.mark.parametrize(
    ("name", "states", "reduced"),
    [
        ("id reuse", 35_435, 11_709),
        ("late sources", 25_238, 9_815),
        ("squeezed pool", 23_579, 4_130),
    ],
)
def test_the_key_names_a_status_incarnation_by_its_life(
    name: str, states: int, reduced: int
) -> None:
    """Ill-typed incarnations made ``status_order`` wrap each in a tuple, and the key stopped
    naming statuses' incarnations by life: the same sets grew by half (35,435 -> 52,340).
    The counts before issue 23's reductions, and with them (fault budgets covered included)."""
    bounds = replace(ADVERSARY_BOUNDS[name], reuse="lifo")
    run = explore(bounds, strategy("epoch"), workers=1, reductions=False)
    assert run.complete and run.violation is None
    assert run.states == states
    run = explore(bounds, strategy("epoch"), workers=1)
    assert run.complete and run.violation is None
    assert run.states == reduced


def test_a_partition_past_its_deadline_stops_capped_not_complete() -> None:
    # verify runs partitions as pool jobs: one begun before its cap must still stop at
    # it (it ran to its end, and `verify --budget 1` took 23 s instead of about 6).
    bounds = bounds_sets(False)[0][1]
    totals = partitions(bounds, strategy("epoch"))[0]
    run = explore_partition(bounds, strategy("epoch"), totals, deadline=time.perf_counter())
    assert run.capped and not run.complete and run.violation is None
    assert run.states < 4096 + 64  # stopped at the first look, not at the end
    small = replace(bounds, blocks=2, max_rounds=1)
    whole = explore_partition(small, strategy("epoch"), partitions(small, strategy("epoch"))[0])
    assert whole.complete and not whole.capped and whole.states > 1
