"""``resumekit`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from resumekit.errors import ResumeKitError
from resumekit.properties.allocator_machine import resumekit_allocator_machine
from resumekit.simulate import check_reuse, format_report, simulate
from resumekit.statemachine import diagram


def _verify(args: argparse.Namespace) -> int:
    print(f"{'check':32s} {'examples':>8s} {'seconds':>8s}  verdict")
    ok = True
    for reuse in ("lifo", "fifo"):
        machine = resumekit_allocator_machine(8, 4, reuse)
        start = time.perf_counter()
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=args.max_examples,
                    stateful_step_count=50,
                    deadline=None,
                    database=None,
                    phases=[Phase.generate, Phase.shrink],
                ),
            )
            verdict = "pass"
        except Exception as error:
            verdict = f"FAIL: {error}"
            ok = False
        seconds = time.perf_counter() - start
        name = f"allocator contract ({reuse})"
        print(f"{name:32s} {args.max_examples:8d} {seconds:8.2f}  {verdict}")
    return 0 if ok else 1


def _simulate(args: argparse.Namespace) -> int:
    report = simulate(
        args.tokens,
        default_allocate=args.default_allocate,
        pool_blocks=args.pool_blocks,
        block_size=args.block_size,
        hidden=args.hidden,
        reuse=check_reuse(args.reuse),
        max_round_tokens=args.max_round_tokens,
        seed=args.seed,
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
    verify = sub.add_parser("verify", help="check resumekit's contracts")
    verify.add_argument("--max-examples", type=int, default=200)
    verify.set_defaults(func=_verify)

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
