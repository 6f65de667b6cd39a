"""``resumekit`` command line: verify (the main job), fuzz, check, simulate, diagram."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from resumekit.errors import InvalidArgumentError, ResumeKitError
from resumekit.properties.explorer import STANDARD_BOUNDS, Exploration, explore
from resumekit.properties.fuzz import FuzzResult, fuzz
from resumekit.properties.model import Bounds
from resumekit.properties.strategies import BROKEN, STRATEGIES, strategy
from resumekit.simulate import check_reuse, format_report, simulate
from resumekit.statemachine import diagram

FAULTS = ("duplicate", "abort", "crash", "pressure")


class Progress:
    """A one-line progress bar on stderr (plain lines when it is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text}"
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
            sys.stderr.flush()
        elif force or now - self._last >= 10:
            print(line, file=sys.stderr, flush=True)
            self._last = now

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text, force=self.done < self.total)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()


def _explore_both(
    name: str, bounds: Bounds, reuse: str, progress: Progress | None, workers: int | None
) -> tuple[int, float, Exploration | None, bool]:
    """Explore under each reuse order: (states, seconds, shortest violating run, complete)."""
    orders = ("lifo", "fifo") if reuse == "both" else (reuse,)
    states, seconds, worst, complete = 0, 0.0, None, True
    for order in orders:
        b = replace(bounds, reuse=order)

        def show(n: int, order: str = order, before: int = states) -> None:
            if progress is not None:
                progress.show(f"explore {name} ({order}): {before + n:,} states")

        run = explore(b, strategy(name), workers=workers, progress=show)
        states += run.states
        seconds += run.seconds
        complete = complete and run.complete
        if run.violation is not None and (
            worst is None
            or worst.violation is None
            or len(run.violation.actions) < len(worst.violation.actions)
        ):
            worst = run
    return states, seconds, worst, complete


def _verify(args: argparse.Namespace) -> int:
    names = [*BROKEN, "epoch"]
    progress = Progress(2 * len(names))
    explored: dict[str, tuple[int, float, Exploration | None, bool]] = {}
    for name in names:
        explored[name] = _explore_both(name, STANDARD_BOUNDS, "both", progress, args.workers)
        progress.step(f"explored {name}")
    fuzzed: dict[str, FuzzResult] = {}
    start = time.perf_counter()
    for name in names:
        left = args.budget - (time.perf_counter() - start)
        share = left if name == "epoch" else min(left, args.budget * 0.15)

        def show(r: FuzzResult, name: str = name) -> None:
            progress.show(f"fuzz {name}: {r.examples:,} examples, {r.seconds:.0f}s")

        fuzzed[name] = fuzz(name, budget=max(share, 1.0), start_seed=args.seed, progress=show)
        progress.step(f"fuzzed {name}")
    progress.close()

    ok = True
    rows = []
    for name in names:
        states, seconds, run, complete = explored[name]
        f = fuzzed[name]
        found = []
        if run is not None and run.violation is not None:
            found.append(f"explorer: {run.violation.invariant}")
        if f.failed:
            found.append(f"fuzz: {f.invariant}")
        if name == "epoch":
            good = not found and complete
            verdict = "verified" if good else "VIOLATED"
        else:
            good = len(found) == 2
            verdict = "caught" if good else "MISSED"
        ok = ok and good
        rows.append(
            (
                name,
                f"{states:,}",
                f"{states / seconds:,.0f}/s" if seconds else "-",
                f"{f.examples:,}",
                "; ".join(found) or "none",
                verdict,
            )
        )
    header = ("strategy", "states explored", "states/s", "fuzz examples", "violations", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    b = STANDARD_BOUNDS
    print(
        f"\nbounds: {b.blocks} blocks, {b.requests} requests, up to {b.max_rounds} rounds each, "
        f"lifo and fifo reuse; faults: {b.duplicates} duplicate, {b.aborts} abort, "
        f"{b.crashes} crash, {b.pressure} pool squeeze; fuzz budget {args.budget:.0f}s"
    )
    for name in names:
        run = explored[name][2]
        f = fuzzed[name]
        if run is not None and run.violation is not None:
            print(f"\n{name}: shortest counterexample (explorer, {run.bounds.reuse} reuse)")
            print(run.violation.format())
        if f.failed:
            print(f"\n{name}: fuzzer's shrunk counterexample ({len(f.actions)} steps)")
            print(f.format())
    print(f"\nverdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _fuzz(args: argparse.Namespace) -> int:
    progress = Progress(1)

    def show(r: FuzzResult) -> None:
        progress.show(f"fuzz {args.strategy}: {r.examples:,} examples, {r.seconds:.0f}s")

    result = fuzz(
        args.strategy,
        budget=args.budget,
        max_examples=args.max_examples,
        start_seed=args.seed,
        progress=show,
    )
    progress.close()
    print(
        f"{args.strategy}: {result.examples:,} examples, {result.steps:,} steps in "
        f"{result.seconds:.1f}s ({result.steps_per_second:,.0f} steps/s), seeds from {args.seed}"
    )
    if result.failed:
        print(result.format())
        return 1
    print("no violation")
    return 0


def _parse_faults(text: str) -> dict[str, int]:
    if text == "all":
        chosen = set(FAULTS)
    elif text == "none":
        chosen = set()
    else:
        chosen = {f.strip() for f in text.split(",") if f.strip()}
        unknown = chosen - set(FAULTS)
        if unknown:
            raise InvalidArgumentError(
                f"unknown fault(s) {sorted(unknown)}; choose from all, none, {', '.join(FAULTS)}"
            )
    return {
        "duplicates": int("duplicate" in chosen),
        "aborts": int("abort" in chosen),
        "crashes": int("crash" in chosen),
        "pressure": int("pressure" in chosen),
    }


def _check(args: argparse.Namespace) -> int:
    faults = _parse_faults(args.faults)
    bounds = Bounds(
        blocks=args.blocks,
        requests=args.requests,
        max_rounds=args.max_rounds,
        default_blocks=args.default_blocks,
        duplicates=faults["duplicates"],
        aborts=faults["aborts"],
        crashes=faults["crashes"],
        pressure=faults["pressure"],
    )
    if not 1 <= bounds.default_blocks <= bounds.blocks:
        raise InvalidArgumentError("--default-blocks must be between 1 and --blocks")
    progress = Progress(1)
    states, seconds, run, complete = _explore_both(
        args.strategy, bounds, args.reuse, progress, args.workers
    )
    progress.close()
    rate = states / seconds if seconds else 0.0
    print(f"{args.strategy}: {states:,} states in {seconds:.1f}s ({rate:,.0f} states/s)")
    if run is not None and run.violation is not None:
        print(f"{run.bounds.reuse} reuse:")
        print(run.violation.format())
        return 1
    print("no violation; every reachable state can finish" if complete else "incomplete")
    return 0 if complete else 1


def _simulate(args: argparse.Namespace) -> int:
    run = simulate
    extra: dict[str, float] = {}
    if args.transport == "torch":
        from resumekit.twoprocess import simulate_distributed  # noqa: PLC0415 - starts torch.distributed

        run = simulate_distributed
        extra = {"timeout": args.timeout}
    report = run(
        args.tokens,
        default_allocate=args.default_allocate,
        pool_blocks=args.pool_blocks,
        block_size=args.block_size,
        hidden=args.hidden,
        reuse=check_reuse(args.reuse),
        max_round_tokens=args.max_round_tokens,
        seed=args.seed,
        **extra,
    )
    print(report.to_json() if args.json else format_report(report))
    ok = report.state == "Success" and report.intact and report.leaked_blocks == 0
    return 0 if ok else 1


def _diagram(args: argparse.Namespace) -> int:
    print(diagram())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resumekit", description="Verified resumable embedding transfers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify", help="explore and fuzz every strategy; exit 0 if epoch holds and the rest fail"
    )
    verify.add_argument("--budget", type=float, default=60.0, help="fuzz seconds in all")
    verify.add_argument("--seed", type=int, default=0, help="first Hypothesis seed")
    verify.add_argument("--workers", type=int, default=None, help="explorer processes")
    verify.set_defaults(func=_verify)

    fz = sub.add_parser("fuzz", help="run the protocol machine against one strategy")
    fz.add_argument("--strategy", choices=list(STRATEGIES), default="epoch")
    limit = fz.add_mutually_exclusive_group()
    limit.add_argument("--budget", type=float, default=None, help="seconds (default 60)")
    limit.add_argument("--max-examples", type=int, default=None)
    fz.add_argument("--seed", type=int, default=0)
    fz.set_defaults(func=_fuzz)

    chk = sub.add_parser("check", help="explore every state of the protocol model")
    chk.add_argument("--strategy", choices=list(STRATEGIES), default="epoch")
    chk.add_argument("--blocks", type=int, default=STANDARD_BOUNDS.blocks)
    chk.add_argument("--requests", type=int, default=STANDARD_BOUNDS.requests)
    chk.add_argument("--max-rounds", type=int, default=STANDARD_BOUNDS.max_rounds)
    chk.add_argument("--default-blocks", type=int, default=STANDARD_BOUNDS.default_blocks)
    chk.add_argument("--reuse", choices=["lifo", "fifo", "both"], default="both")
    chk.add_argument("--faults", default="all", help="all, none, or a list of " + ",".join(FAULTS))
    chk.add_argument("--workers", type=int, default=None)
    chk.set_defaults(func=_check)

    sim = sub.add_parser("simulate", help="one in-process transfer, round by round")
    sim.add_argument("--tokens", type=int, default=50_000, help="embedding length")
    sim.add_argument("--default-allocate", type=int, default=8192, help="round 0 size")
    sim.add_argument("--pool-blocks", type=int, default=None, help="default: fits the embedding")
    sim.add_argument("--block-size", type=int, default=128)
    sim.add_argument("--hidden", type=int, default=64)
    sim.add_argument("--reuse", choices=["lifo", "fifo"], default="lifo")
    sim.add_argument("--max-round-tokens", type=int, default=None, help="cap on each resume")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true", help="print a JSON report")
    sim.add_argument(
        "--transport",
        choices=["inprocess", "torch"],
        default="inprocess",
        help="torch: sender and receiver in two processes over torch.distributed (gloo)",
    )
    sim.add_argument(
        "--timeout", type=float, default=30.0, help="(torch) seconds without progress = peer lost"
    )
    sim.set_defaults(func=_simulate)

    diag = sub.add_parser("diagram", help="the protocol as a Mermaid state diagram")
    diag.set_defaults(func=_diagram)

    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ResumeKitError as error:
        print(f"resumekit: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
