"""``resumekit simulate``: what makes a run impossible, checked before it starts, and the run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import torch

from resumekit.allocator.block_allocator import MAX_NUM_BLOCKS
from resumekit.allocator.buffers import default_device, device_memory_bytes
from resumekit.cli._args import MAX_TOKENS, Round0
from resumekit.errors import InvalidArgumentError
from resumekit.protocol.receiver import (
    AUTO,
    DEFAULT_ALLOCATE_TOKENS,
    ENV_DEFAULT_ALLOCATE_TOKENS,
    default_allocate_tokens_from_env,
)
from resumekit.sim.simulate import (
    SimulationReport,
    check_reuse,
    default_pool_blocks,
    format_report,
    simulate,
)


def _simulate_problem(args: argparse.Namespace, default_allocate: Round0) -> str | None:
    """What makes this simulate run impossible, naming the flags; None when it can run."""
    from_env = args.default_allocate is None and os.environ.get(ENV_DEFAULT_ALLOCATE_TOKENS)
    source = ENV_DEFAULT_ALLOCATE_TOKENS if from_env else "--default-allocate"
    first = DEFAULT_ALLOCATE_TOKENS if isinstance(default_allocate, str) else default_allocate
    pool_blocks = args.pool_blocks
    sized_by = f"--pool-blocks {pool_blocks}"
    if pool_blocks is None:
        pool_blocks = default_pool_blocks(args.tokens, default_allocate, args.block_size)
        sized_by = (
            f"a pool of {pool_blocks} blocks (sized for --tokens {args.tokens})"
            if args.tokens >= first
            else f"a pool of {pool_blocks} blocks (sized for round 0's {first} tokens, {source})"
        )
    elif -(-first // args.block_size) > pool_blocks and not isinstance(default_allocate, str):
        return (
            f"round 0's {default_allocate} tokens ({source}) need more blocks of --block-size "
            f"{args.block_size} than --pool-blocks {pool_blocks}: it could never be allocated"
        )
    if pool_blocks > MAX_NUM_BLOCKS:
        return f"{sized_by} of --block-size {args.block_size} exceeds {MAX_NUM_BLOCKS:,} blocks"
    if args.device is None:
        args.device = "cpu" if args.transport != "inprocess" else default_device().type
    elif args.device == "cuda" and args.transport == "torch":
        return (
            "--device cuda with --transport torch needs NCCL between two GPUs; this "
            "simulation runs its two processes over gloo (--device cpu)"
        )
    elif args.device == "cuda" and args.transport == "mooncake":
        return (
            "--device cuda with --transport mooncake needs the CUDA build of the transfer "
            "engine; this simulation runs its two processes on the CPU (--device cpu)"
        )
    elif args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available on this machine"
    # bf16 source and output, and the pool's blocks.
    needed = (2 * args.tokens + pool_blocks * args.block_size) * args.hidden * 2
    memory = device_memory_bytes(torch.device(args.device))
    if memory is not None and needed > memory:
        return (
            f"--tokens {args.tokens}, --hidden {args.hidden} and {sized_by} of --block-size "
            f"{args.block_size} need {needed:,} bytes, more than the {memory:,} of --device "
            f"{args.device}"
        )
    return None


def _default_allocate(args: argparse.Namespace) -> Round0:
    """Round 0's tokens: --default-allocate, else the variable as the receiver reads it."""
    if args.default_allocate is not None:
        return cast(Round0, args.default_allocate)
    raw = os.environ.get(ENV_DEFAULT_ALLOCATE_TOKENS)
    if raw == AUTO:
        return AUTO
    value = default_allocate_tokens_from_env()
    if value > MAX_TOKENS:
        raise InvalidArgumentError(
            f"{ENV_DEFAULT_ALLOCATE_TOKENS}={raw} must be <= {MAX_TOKENS} (token counts are int32)"
        )
    return value


def _simulate(args: argparse.Namespace) -> int:
    default_allocate = _default_allocate(args)
    problem = _simulate_problem(args, default_allocate)
    if problem is not None:
        print(f"resumekit simulate: {problem}", file=sys.stderr)
        return 2
    run: Callable[..., SimulationReport] = simulate
    extra: dict[str, Any] = {"device": args.device}
    if args.transport != "inprocess":
        from resumekit.sim.twoprocess import simulate_distributed  # noqa: PLC0415 - starts torch.distributed

        run = simulate_distributed
        extra = {"timeout": args.timeout, "transport": args.transport}
    report = run(
        args.tokens,
        default_allocate=default_allocate,
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
