"""``resumekit verify``: both checkers against resumekit's design and the three it replaced.

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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Final

from resumekit._check import as_cap_seconds, as_int, check_bool, check_callback
from resumekit.errors import InvalidArgumentError
from resumekit.properties.bounds import bounds_sets, describe
from resumekit.properties.explorer import Exploration, explore
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
            if self.capped or not all(r.complete for _, r in self.explorations):
                return "INCONCLUSIVE"
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

    @property
    def verdict(self) -> Verdict:
        verdicts = [s.verdict for s in self.strategies]
        if any(v in ("VIOLATED", "MISSED") for v in verdicts):
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

    # The fuzzer runs in a process of its own while the explorer runs: it fills the
    # CPU the explorer's partitions leave idle. Both are budgeted in work, not time.
    names = (*BROKEN, EPOCH)
    jobs = [
        (name, examples if name == EPOCH else broken_examples, seed, cap_seconds, database)
        for name in names
    ]
    with fork_pool(1) as pool:
        fuzzing = pool.map_async(_fuzz_job, jobs)
        for name in names:
            entry = StrategyReport(name)
            report.strategies.append(entry)
            sets = bounds_sets(quick) if name == EPOCH else [bounds_sets(quick)[0]]
            for set_name, bounds in sets:
                if quick and entry.violation is not None:
                    break  # a finding is all a mutation run needs
                for order in ORDERS[:1] if quick and set_name != "quick" else ORDERS:
                    say(f"explore {name}: {set_name} bounds, {order} reuse")
                    run = explore(
                        replace(bounds, reuse=order),
                        strategy(name),
                        workers=workers,
                        first_only=name != EPOCH,
                        deadline=deadline,
                    )
                    entry.explorations.append((f"{set_name} ({order})", run))
        say("fuzz every strategy")
        for entry, fuzzed in zip(report.strategies, fuzzing.get(), strict=True):
            entry.fuzzed = fuzzed
    report.seconds = time.perf_counter() - start
    return report


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
