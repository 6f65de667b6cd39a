"""``resumekit`` command line: verify (the main job), fuzz, check, simulate, diagram."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from resumekit import __version__
from resumekit.allocator.block_allocator import MAX_BLOCK_SIZE, MAX_NUM_BLOCKS
from resumekit.cli._args import (
    MAX_SEED,
    MAX_TOKENS,
    Progress,
    _at_least,
    _HelpFormatter,
    _parse_faults,
    _seconds,
    _timeout,
    _tokens_or_auto,
)
from resumekit.cli._simulate import _simulate
from resumekit.errors import InvalidArgumentError, ResumeKitError
from resumekit.properties.bounds import (
    FAULTS,
    MAX_BOUND,
    STANDARD_BOUNDS,
    STANDARD_FAULTS,
    Bounds,
    bounds_sets,
    with_faults,
)
from resumekit.properties.explorer import Exploration, explore
from resumekit.properties.fuzz import (
    DEFAULT_DATABASE,
    FuzzResult,
    fuzz,
    replay,
    writable_database,
)
from resumekit.properties.strategies import BROKEN, STRATEGIES, strategy
from resumekit.properties.verify import (
    DEFAULT_BROKEN_EXAMPLES,
    DEFAULT_EXAMPLES,
    QUICK_EXAMPLES,
    verify,
)
from resumekit.properties.verify import format_report as format_verify
from resumekit.protocol.declaration import diagram


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
        if progress is not None:
            progress.step(f"explored {name} ({order}): {states + run.states:,} states")
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


def _examples(quick: bool) -> int:
    return QUICK_EXAMPLES if quick else DEFAULT_EXAMPLES


def _verify(args: argparse.Namespace) -> int:
    problem = _folder_problem(args)
    if problem is not None:
        print(f"resumekit verify: {problem}", file=sys.stderr)
        return 2
    sets = len(bounds_sets(args.quick))
    progress = Progress(2 * len(BROKEN) + (sets + 1 if args.quick else 2 * sets) + 1)

    def show(text: str) -> None:
        progress.step(text)

    quick = args.quick
    report = verify(
        examples=args.examples if args.examples is not None else _examples(quick),
        broken_examples=args.broken_examples,
        quick=quick,
        seed=args.seed,
        workers=args.workers,
        cap_seconds=args.budget,
        database=args.database,
        progress=show,
    )
    progress.close()
    print(format_verify(report))
    return report.verdict.value


def _folder_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --database (or --replay), naming the flag; None when usable."""
    if getattr(args, "replay", None) is not None:
        if not os.path.isdir(args.replay):
            return f"--replay {args.replay!r}: no example database (a folder) there"
        return None
    try:
        writable_database(args.database, "--database")
    except InvalidArgumentError as error:
        return str(error)
    return None


def _fuzz(args: argparse.Namespace) -> int:
    problem = _folder_problem(args)
    if problem is not None:
        print(f"resumekit fuzz: {problem}", file=sys.stderr)
        return 2
    if args.replay is not None:
        result = replay(args.strategy, args.replay)
        if not result.runs:
            print(f"{args.strategy}: no example saved in {args.replay} for this strategy")
            return 0
        print(f"{args.strategy}: replayed {result.runs} saved example(s) from {args.replay}")
        if result.failed:
            print(result.format())
            return 1
        print("no saved example fails now")
        return 0
    progress = Progress(args.max_examples)

    def show(r: FuzzResult) -> None:
        progress.done = r.examples
        progress.show(f"fuzz {args.strategy}: {r.examples:,} examples, {r.seconds:.0f}s")

    result = fuzz(
        args.strategy,
        max_examples=args.max_examples,
        start_seed=args.seed,
        cap_seconds=args.budget,
        database=args.database,
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
    if result.capped:
        print(
            f"inconclusive: the {args.budget:g}s cap stopped it before {args.max_examples} examples"
        )
        return 3
    print("no violation")
    return 0


def _check(args: argparse.Namespace) -> int:
    if not args.default_blocks <= args.blocks:
        print("resumekit check: --default-blocks must not exceed --blocks", file=sys.stderr)
        return 2
    takers = [
        f.name for f in FAULTS if f.field in ("pressure", "squeezes") and f.name in args.faults
    ]
    if len(takers) > args.blocks:
        print(
            f"resumekit check: --faults {','.join(takers)} take {len(takers)} blocks from the "
            f"pool, more than --blocks {args.blocks}",
            file=sys.stderr,
        )
        return 2
    bounds = with_faults(
        Bounds(
            blocks=args.blocks,
            requests=args.requests,
            max_rounds=args.max_rounds,
            default_blocks=args.default_blocks,
        ),
        args.faults,
    )
    progress = Progress(2 if args.reuse == "both" else 1)
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


def _diagram(args: argparse.Namespace) -> int:
    print(diagram())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``resumekit`` parser: every subcommand, every flag with its help and default."""
    parser = argparse.ArgumentParser(
        prog="resumekit", description="Verified resumable embedding transfers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify",
        help="explore and fuzz every strategy; exit 0 if epoch holds and the rest fail",
        description="Explore the real receiver, sender and allocator under the standard "
        "and adversary bounds and fuzz them, for resumekit's epoch design and the three it "
        "replaced, and call their public API with bad and good values. Exit 0 (PASS) when "
        "epoch holds, each broken design is caught by both checkers and every contract holds, "
        "1 (FAIL) otherwise, 3 (INCONCLUSIVE) when --budget stopped it early.",
        formatter_class=_HelpFormatter,
    )
    verify.add_argument(
        "--examples",
        type=_at_least(1),
        default=None,
        help=f"epoch's fuzz examples (default: {DEFAULT_EXAMPLES}; {QUICK_EXAMPLES} with --quick)",
    )
    verify.add_argument(
        "--quick",
        action="store_true",
        help="the mutation run's check: a smaller pool instead of the standard bounds, the "
        "adversary sets in LIFO order only, fewer examples, stop at the first finding",
    )
    verify.add_argument(
        "--broken-examples",
        type=_at_least(1),
        default=DEFAULT_BROKEN_EXAMPLES,
        help="fuzz examples at most for each broken design",
    )
    verify.add_argument(
        "--budget",
        type=_seconds,
        default=None,
        help="a cap in seconds; reaching it makes the verdict INCONCLUSIVE (default: none)",
    )
    verify.add_argument("--seed", type=_at_least(0, MAX_SEED), default=0, help="first fuzz seed")
    verify.add_argument(
        "--workers", type=_at_least(1), default=None, help="explorer processes (default: CPUs)"
    )
    verify.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="where falsifying examples are saved for replay",
    )
    verify.set_defaults(func=_verify)

    fz = sub.add_parser(
        "fuzz",
        help="run the protocol machine against one strategy",
        description="Fuzz the real receiver, sender, allocator and transport with Hypothesis. "
        "Exit 1 with the shrunk steps and a replay command, 0 when nothing failed, 3 when "
        "--budget stopped it before --max-examples.",
        formatter_class=_HelpFormatter,
    )
    fz.add_argument(
        "--strategy", choices=list(STRATEGIES), default="epoch", help="the round filter to fuzz"
    )
    fz.add_argument(
        "--max-examples",
        type=_at_least(1),
        default=DEFAULT_EXAMPLES,
        help="examples to run",
    )
    fz.add_argument(
        "--budget", type=_seconds, default=None, help="a cap in seconds (default: none)"
    )
    fz.add_argument("--seed", type=_at_least(0, MAX_SEED), default=0, help="first seed")
    fz.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="where a falsifying example is saved",
    )
    fz.add_argument(
        "--replay",
        metavar="DIR",
        default=None,
        help="run the falsifying examples saved in DIR instead of fuzzing",
    )
    fz.set_defaults(func=_fuzz)

    chk = sub.add_parser(
        "check",
        help="explore every state of the real protocol objects",
        description="Bounded exhaustive exploration of the shipped receiver, sender and "
        "allocator. Exit 1 with a numbered list of actions to the first violation.",
        formatter_class=_HelpFormatter,
    )
    chk.add_argument(
        "--strategy", choices=list(STRATEGIES), default="epoch", help="the round filter to explore"
    )
    for flag, value, what in (
        ("--blocks", STANDARD_BOUNDS.blocks, "blocks in the pool"),
        ("--requests", STANDARD_BOUNDS.requests, "requests"),
        ("--max-rounds", STANDARD_BOUNDS.max_rounds, "rounds per request at most"),
        ("--default-blocks", STANDARD_BOUNDS.default_blocks, "blocks of round 0"),
    ):
        top = MAX_BOUND[flag[2:].replace("-", "_")]
        chk.add_argument(flag, type=_at_least(1, top), default=value, help=f"{what} (1..{top})")
    chk.add_argument(
        "--reuse",
        choices=["lifo", "fifo", "both"],
        default="both",
        help="order freed blocks come back; both explores each",
    )
    chk.add_argument(
        "--faults",
        type=_parse_faults,
        default=_parse_faults("standard"),
        help="standard ("
        + ",".join(STANDARD_FAULTS)
        + "), all, none, or a list of "
        + ",".join(f.name for f in FAULTS)
        + "; each at most once (default: standard)",
    )
    chk.add_argument("--workers", type=_at_least(1), default=None, help="processes (default: CPUs)")
    chk.set_defaults(func=_check)

    sim = sub.add_parser(
        "simulate",
        help="one transfer, round by round",
        description="Move one random embedding through the receiver, sender and allocator and "
        "print every round: in one process, or in two over torch.distributed (--transport "
        "torch) or the Mooncake transfer engine (--transport mooncake). Exit 0 when it arrives "
        "intact with nothing leaked.",
        formatter_class=_HelpFormatter,
    )
    sim.add_argument(
        "--tokens", type=_at_least(1, MAX_TOKENS), default=50_000, help="embedding length"
    )
    sim.add_argument(
        "--default-allocate",
        type=_tokens_or_auto,
        default=None,
        help="tokens of round 0, or auto to let the receiver size it (default: "
        "$RESUMEKIT_DEFAULT_ALLOCATE_TOKENS, else 8192)",
    )
    sim.add_argument(
        "--pool-blocks",
        type=_at_least(1, MAX_NUM_BLOCKS),
        default=None,
        help="blocks in the pool (default: enough for the whole embedding)",
    )
    sim.add_argument(
        "--block-size", type=_at_least(1, MAX_BLOCK_SIZE), default=128, help="tokens per block"
    )
    sim.add_argument(
        "--hidden", type=_at_least(1, MAX_TOKENS), default=64, help="hidden size of a token"
    )
    sim.add_argument(
        "--reuse", choices=["lifo", "fifo"], default="lifo", help="order freed blocks come back"
    )
    sim.add_argument(
        "--max-round-tokens",
        type=_at_least(1, MAX_TOKENS),
        default=None,
        help="tokens each resume may allocate at most (default: no cap)",
    )
    sim.add_argument(
        "--seed", type=_at_least(0, MAX_SEED), default=0, help="seed of the random embedding"
    )
    sim.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where the blocks live (default: cuda when present, else cpu; cpu with "
        "--transport torch or mooncake)",
    )
    sim.add_argument("--json", action="store_true", help="print a JSON report")
    sim.add_argument(
        "--transport",
        choices=["inprocess", "torch", "mooncake"],
        default="inprocess",
        help="torch: sender and receiver in two processes over torch.distributed (gloo); "
        "mooncake: over the Mooncake transfer engine (TCP), control over ZMQ",
    )
    sim.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        help="(--transport torch or mooncake) seconds without progress before the peer counts "
        "as lost",
    )
    sim.set_defaults(func=_simulate)

    diag = sub.add_parser(
        "diagram",
        help="the protocol as a Mermaid state diagram",
        description="Print the protocol's states and transitions as a Mermaid state diagram.",
    )
    diag.set_defaults(func=_diagram)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ResumeKitError as error:
        print(f"resumekit: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
