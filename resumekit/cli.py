"""``resumekit`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from resumekit.properties.allocator_machine import resumekit_allocator_machine


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resumekit", description="Verified resumable embedding transfers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check resumekit's contracts")
    verify.add_argument("--max-examples", type=int, default=200)
    verify.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
