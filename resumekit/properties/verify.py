"""``resumekit verify``: both checkers against resumekit's design and the three it replaced,
and the contracts of the allocator's, receiver's and sender's public calls
(:mod:`~resumekit.properties.contracts`).

The budgets are states and examples, never seconds, so the verdict is the same
on a fast idle machine and a slow loaded one: the explorer exhausts the
standard bounds and every set of
:data:`~resumekit.properties.bounds.ADVERSARY_BOUNDS` for ``epoch`` (both reuse
orders), and looks for the first violation of each broken design under the
standard bounds; the fuzzer runs a fixed number of seeded examples. An
optional seconds cap only ever makes a run INCONCLUSIVE, never PASS or FAIL.
The fuzzer does not shrink what it finds against a broken design (that it finds
one is the verdict; shrinking took about 80% of their fuzzing): the explorer's
counterexample of each is already the shortest. A finding against ``epoch`` is shrunk.
Every partition of every exploration and every fuzz run is one job of one process
pool, the longest first, so no CPU idles while another ends an exploration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Final

from resumekit._check import as_cap_seconds, as_int, check_bool, check_callback
from resumekit.errors import InvalidArgumentError
from resumekit.properties.bounds import Bounds, bounds_sets, describe
from resumekit.properties.contracts import ContractReport, check_contracts
from resumekit.properties.explorer import (
    Exploration,
    combine,
    explore,
    explore_partition,
    partitions,
)
from resumekit.properties.forking import fork_pool
from resumekit.properties.fuzz import DEFAULT_DATABASE, FuzzResult, fuzz, writable_database
from resumekit.properties.strategies import BROKEN, strategy

EPOCH: Final = "epoch"
ORDERS: Final = ("lifo", "fifo")
DEFAULT_EXAMPLES: Final = 600  # fuzz examples for epoch
DEFAULT_BROKEN_EXAMPLES: Final = 400  # at most, for each broken design
#: ``--quick`` (the mutation run's check): the quick bounds instead of the standard
#: bounds, every adversary set in LIFO order only, fewer examples, a stop at the first finding.
QUICK_EXAMPLES: Final = 150


class Verdict(Enum):
    PASS = 0
    FAIL = 1
    INCONCLUSIVE = 3


@dataclass
class StrategyReport:
    name: str
    explorations: list[tuple[str, Exploration]] = field(default_factory=list)  # (bounds, run)
    fuzzed: FuzzResult | None = None

    @property
    def states(self) -> int:
        return sum(run.states for _, run in self.explorations)

    @property
    def seconds(self) -> float:
        return sum(run.seconds for _, run in self.explorations)

    @property
    def violation(self) -> tuple[str, Exploration] | None:
        """The exploration with the shortest counterexample, if any."""
        found = [(n, r) for n, r in self.explorations if r.violation is not None]
        if not found:
            return None
        return min(found, key=lambda item: len(item[1].violation.actions))  # type: ignore[union-attr]

    @property
    def capped(self) -> bool:
        return any(r.capped for _, r in self.explorations) or bool(
            self.fuzzed is not None and self.fuzzed.capped
        )

    @property
    def verdict(self) -> str:
        explorer = self.violation is not None
        fuzzer = self.fuzzed is not None and self.fuzzed.failed
        if self.name == EPOCH:
            if explorer or fuzzer:
                return "VIOLATED"
            ran = bool(self.explorations) and self.fuzzed is not None
            if not ran or self.capped or not all(r.complete for _, r in self.explorations):
                return "INCONCLUSIVE"  # a check that checked nothing proves nothing
            return "verified"
        if explorer and fuzzer:
            return "caught"
        return "INCONCLUSIVE" if self.capped else "MISSED"


@dataclass
class VerifyReport:
    strategies: list[StrategyReport]
    examples: int
    broken_examples: int
    cap_seconds: float | None
    quick: bool = False
    seconds: float = 0.0
    contracts: ContractReport | None = None

    @property
    def verdict(self) -> Verdict:
        verdicts = [s.verdict for s in self.strategies]
        if any(v in ("VIOLATED", "MISSED") for v in verdicts):
            return Verdict.FAIL
        if self.contracts is None or not self.contracts.ok:
            return Verdict.FAIL
        if any(v == "INCONCLUSIVE" for v in verdicts):
            return Verdict.INCONCLUSIVE
        return Verdict.PASS


def verify(
    *,
    examples: int = DEFAULT_EXAMPLES,
    broken_examples: int = DEFAULT_BROKEN_EXAMPLES,
    seed: int = 0,
    workers: int | None = None,
    cap_seconds: float | None = None,
    database: str | Path | None = DEFAULT_DATABASE,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run both checkers on every strategy; see the module docstring for the budgets.

    ``quick`` checks less (:data:`~resumekit.properties.bounds.QUICK_BOUNDS`) and stops
    at the first finding against ``epoch``: it is the check a mutation run applies to every mutant.
    """
    for name, value in (("examples", examples), ("broken_examples", broken_examples)):
        if type(value) is not int or value < 1:
            raise InvalidArgumentError(
                f"{name} must be an int >= 1: a run that checks nothing "
                f"could say nothing, got {value!r}"
            )
    cap_seconds = as_cap_seconds(cap_seconds, "cap_seconds")
    check_bool(quick, "quick")
    check_callback(progress, "progress")
    if workers is not None:
        as_int(workers, "workers", minimum=1)
    as_int(seed, "seed", minimum=0)
    if database is not None:
        database = writable_database(database)  # before minutes of exploring, not after
    start = time.perf_counter()
    deadline = None if cap_seconds is None else start + cap_seconds
    report = VerifyReport([], examples, broken_examples, cap_seconds, quick)

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    # Every partition of every exploration and every fuzz run is one job of one pool,
    # the longest first, so no worker idles while another finishes an exploration's
    # last partition. Budgets are work, not time, so the results are the same
    # whatever order the jobs end in; only a deadline depends on time.
    names = (*BROKEN, EPOCH)
    report.strategies = [StrategyReport(name) for name in names]
    planned = _plan(report, quick)
    jobs: list[_Job] = [("contracts", 0, ())]
    jobs += [
        ("fuzz", i, (name, examples if name == EPOCH else broken_examples, seed, cap_seconds, db))
        for i, name in enumerate(names)
        for db in (database,)
    ]
    jobs += [
        ("explore", i, (p.entry.name, p.bounds, totals, deadline))
        for i, p in enumerate(planned)
        for totals in p.seeds
    ]
    jobs.sort(key=_cost, reverse=True)
    fuzzed: dict[int, FuzzResult] = {}
    stop_rank: int | None = None  # quick: the first bounds set epoch failed in

    def needed(p: _Planned) -> bool:
        return stop_rank is None or p.entry.name != EPOCH or p.rank <= stop_rank

    with fork_pool(workers or os.cpu_count() or 1) as pool:
        for _kind, i, result in pool.imap_unordered(_run, jobs):
            if isinstance(result, ContractReport):
                report.contracts = result
            elif isinstance(result, FuzzResult):
                fuzzed[i] = result
            elif isinstance(result, Exploration):
                p = planned[i]
                p.parts.append(result)
                if p.done:
                    say(f"explored {p.entry.name}: {p.label}")
                if quick and p.entry.name == EPOCH and result.violation is not None:
                    # A finding is all a mutation run needs: the sets after this one go,
                    # those before it finish, so the report is the same in any job order.
                    stop_rank = p.rank if stop_rank is None else min(stop_rank, p.rank)
            if (
                report.contracts is not None
                and len(fuzzed) == len(names)
                and all(p.done for p in planned if needed(p))
            ):
                pool.terminate()  # only jobs nobody needs are left
                break
    say("fuzz every strategy")
    for p in planned:
        if needed(p):
            p.entry.explorations.append((p.label, p.result()))
    for i, entry in enumerate(report.strategies):
        entry.fuzzed = fuzzed[i]
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Planned:
    """One exploration ``verify`` runs: its partitions' totals, and those explored so far."""

    entry: StrategyReport
    label: str
    bounds: Bounds
    rank: int  # the bounds set's place in bounds_sets()
    seeds: list[tuple[int, ...]]  # partitions; ``[()]``: one job explores all, first only
    parts: list[Exploration] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.parts) == len(self.seeds)

    def result(self) -> Exploration:
        if self.seeds == [()]:
            return self.parts[0]
        run = combine(self.bounds, strategy(EPOCH), self.parts, partitions=len(self.seeds))
        run.capped = any(part.capped for part in self.parts)
        run.complete = run.complete and not run.capped
        return run


def _plan(report: VerifyReport, quick: bool) -> list[_Planned]:
    """Every exploration of every strategy, in the order the report lists them."""
    planned = []
    for entry in report.strategies:
        sets = bounds_sets(quick) if entry.name == EPOCH else [bounds_sets(quick)[0]]
        for rank, (set_name, bounds) in enumerate(sets):
            for order in ORDERS[:1] if quick and set_name != "quick" else ORDERS:
                b = replace(bounds, reuse=order)
                seeds: list[tuple[int, ...]] = [()]  # a broken design: first only, one job
                if entry.name == EPOCH:
                    seeds = partitions(b, strategy(EPOCH))
                planned.append(_Planned(entry, f"{set_name} ({order})", b, rank, seeds))
    return planned


_Job = tuple[str, int, tuple[Any, ...]]


def _cost(job: _Job) -> tuple[int, int, int]:
    """A guess at how long a job takes, for longest first: epoch's fuzz, then the
    partitions by their bounds and totals, then the broken designs (cheap)."""
    kind, _, args = job
    if kind == "contracts":
        return (0, 0, 0)
    if kind == "fuzz":
        return (2 if args[0] == EPOCH else 0, 0, args[1])
    bounds, totals = args[1], args[2]
    if not totals:
        return (0, 1, 0)
    return (1, bounds.blocks * bounds.max_rounds, sum(totals))


def _run(job: _Job) -> tuple[str, int, FuzzResult | Exploration | ContractReport]:
    """One job, in a worker: the contracts, a fuzz run, a partition of epoch, or a broken
    design's first-only exploration; one whose turn comes after the deadline is capped, not run."""
    kind, i, args = job
    if kind == "contracts":
        return kind, i, check_contracts()
    if kind == "fuzz":
        return kind, i, _fuzz_job(args)
    name, bounds, totals, deadline = args
    if deadline is not None and time.perf_counter() >= deadline:
        late = Exploration(name, bounds)
        late.capped = True
        return kind, i, late
    if not totals:
        run = explore(bounds, strategy(name), workers=1, first_only=True, deadline=deadline)
        return kind, i, run
    return kind, i, explore_partition(bounds, strategy(name), totals, deadline=deadline)


def _fuzz_job(job: tuple[str, int, int, float | None, str | Path | None]) -> FuzzResult:
    name, examples, seed, cap_seconds, database = job
    return fuzz(
        name,
        max_examples=examples,
        start_seed=seed,
        cap_seconds=cap_seconds,
        database=database,
        shrink=name == EPOCH,
    )


def format_report(report: VerifyReport) -> str:
    """The table, the bounds, the counterexamples and the verdict, as ``verify`` prints them."""
    rows = []
    for s in report.strategies:
        found = []
        worst = s.violation
        if worst is not None:
            found.append(f"explorer: {worst[1].violation.invariant}")  # type: ignore[union-attr]
        if s.fuzzed is not None and s.fuzzed.failed:
            found.append(f"fuzz: {s.fuzzed.invariant}")
        rows.append(
            (
                s.name,
                f"{s.states:,}",
                f"{s.states / s.seconds:,.0f}/s" if s.seconds else "-",
                f"{s.fuzzed.examples:,}" if s.fuzzed is not None else "-",
                "; ".join(found) or "none",
                s.verdict,
            )
        )
    header = ("strategy", "states explored", "states/s", "fuzz examples", "violations", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.append("")
    contracts = report.contracts
    if contracts is not None:
        verdict = (
            "each bad value refused (typed, named, nothing changed), each good one accepted"
            if contracts.ok
            else f"{len(contracts.broken)} broken"
        )
        lines.append(f"contracts: {contracts.cases} calls of the public API: {verdict}")
        lines.extend(f"  {name}: {problem}" for name, problem in contracts.broken)
    sets = bounds_sets(report.quick)
    first = sets[0][0]
    orders = "quick in both reuse orders, the rest lifo" if report.quick else "both reuse orders"
    lines.append(f"bounds explored for epoch ({orders}); the broken designs under {first}:")
    for name, b in sets:
        lines.append(f"  {name}: {describe(b)}")
    lines.append(
        f"fuzz: {report.examples:,} examples for epoch, up to {report.broken_examples:,} "
        "for each broken design"
        + (f"; capped at {report.cap_seconds:g}s" if report.cap_seconds is not None else "")
    )
    for s in report.strategies:
        worst = s.violation
        if worst is not None:
            lines.append(f"\n{s.name}: shortest counterexample (explorer, {worst[0]} bounds)")
            lines.append(worst[1].violation.format())  # type: ignore[union-attr]
        fuzzed = s.fuzzed
        if fuzzed is not None and fuzzed.failed and fuzzed.shrunk:
            count = len(fuzzed.actions)
            lines.append(f"\n{s.name}: fuzzer's shrunk counterexample ({count} steps)")
            lines.append(fuzzed.format())
        elif fuzzed is not None and fuzzed.failed:
            lines.append(
                f"\n{s.name}: fuzzer's counterexample ({len(fuzzed.actions)} steps, not shrunk; "
                f"resumekit fuzz --strategy {s.name} shrinks it)"
            )
            lines.append(fuzzed.format(steps=False))
        if s.verdict == "INCONCLUSIVE":
            lines.append(f"\n{s.name}: the seconds cap stopped it before its budget ran out")
    lines.append(f"\nverdict: {report.verdict.name}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_BROKEN_EXAMPLES",
    "DEFAULT_EXAMPLES",
    "StrategyReport",
    "Verdict",
    "VerifyReport",
    "format_report",
    "verify",
]
