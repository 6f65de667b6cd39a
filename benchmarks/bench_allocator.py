"""Allocator and buffer timing, each against a baseline measured in the same run.

    python benchmarks/bench_allocator.py [--check]

1. allocate+free of 64 blocks from a 4096-block pool vs an unchecked deque free list;
2. the same on a 1,048,576-block pool vs the 4096-block pool;
3. read_into of 64 blocks x 128 tokens x 4096 hidden (bf16) vs one contiguous copy_.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys

import torch
from _flags import count  # benchmarks/ is on sys.path as the script's dir
from _timing import (
    Row,
    interleaved_medians,
    report,
)  # benchmarks/ is on sys.path as the script's dir

from resumekit import BlockAllocator, BlockBuffers, EmbeddingTensors
from resumekit.allocator.buffers import default_device

BLOCKS = 64
BLOCK_SIZE = 128


def deque_round_trip(num_blocks: int):  # type: ignore[no-untyped-def]
    free = collections.deque(range(num_blocks))

    def run() -> None:
        blocks = [free.popleft() for _ in range(BLOCKS)]
        free.extend(blocks)

    return run


def checked_round_trip(num_blocks: int, reuse: str):  # type: ignore[no-untyped-def]
    pool = BlockAllocator(num_blocks, BLOCK_SIZE, reuse=reuse)  # type: ignore[arg-type]
    tokens = BLOCKS * BLOCK_SIZE
    allocate, free = pool.allocate, pool.free

    def run() -> None:
        free(allocate(tokens, "r"))  # type: ignore[arg-type]

    return run


def bench_allocator() -> list[Row]:
    t = interleaved_medians(
        {
            "deque": deque_round_trip(4096),
            "lifo": checked_round_trip(4096, "lifo"),
            "fifo": checked_round_trip(4096, "fifo"),
            "lifo_1m": checked_round_trip(1 << 20, "lifo"),
            "fifo_1m": checked_round_trip(1 << 20, "fifo"),
        },
        inner=2000,
    )
    us = {k: v * 1e6 for k, v in t.items()}
    print(f"allocate+free of {BLOCKS} blocks (median us per round trip)")
    for name, value in us.items():
        print(f"  {name:8s} {value:7.3f} us")
    rows = []
    for reuse in ("lifo", "fifo"):
        r = us[reuse] / us["deque"]
        rows.append((f"{reuse} checked / unchecked deque (<= 1.0)", r, r <= 1.0))
        rows.append((f"{reuse} checked, absolute us (<= 5)", us[reuse], us[reuse] <= 5.0))
        r = us[f"{reuse}_1m"] / us[reuse]
        rows.append((f"{reuse} 1,048,576 / 4096 blocks (<= 1.5)", r, r <= 1.5))
    return rows


def bench_read_into(hidden: int, device: torch.device) -> list[Row]:
    rows = []
    for layout in ("fresh", "scattered"):
        r = read_into_ratio(hidden, device, scattered=layout == "scattered")
        rows.append((f"read_into / copy_ bandwidth, {layout} (>= 0.6)", r, r >= 0.6))
    return rows


def read_into_ratio(hidden: int, device: torch.device, *, scattered: bool) -> float:
    """Bandwidth of read_into as a fraction of one contiguous copy_ of the same bytes."""
    pool = BlockAllocator(4 * BLOCKS, BLOCK_SIZE, reuse="fifo")
    if scattered:
        held = [pool.allocate(BLOCK_SIZE, i) for i in range(pool.num_blocks)]
        random.Random(0).shuffle(held)
        for h in held:
            pool.free(h)  # type: ignore[arg-type]
    buf = BlockBuffers(pool, hidden, device=device)
    n = BLOCKS * BLOCK_SIZE
    a = pool.allocate(n, "r")
    assert a is not None
    src = EmbeddingTensors(
        torch.randn(n, hidden).to(torch.bfloat16).to(device),
        torch.arange(n, dtype=torch.int32, device=device),
        torch.arange(3 * n, dtype=torch.int32, device=device).view(3, n),
    )
    # CUDA copies are asynchronous: each timed call waits for its own to finish.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    buf.write(a, src.embeddings, src.fill_ids, src.mrope)
    out = buf.new_output(n)
    dst = torch.empty_like(src.embeddings)
    t = interleaved_medians(
        {
            "copy_": lambda: (dst.copy_(src.embeddings), sync()),
            "read_into": lambda: (buf.read_into(a, n, out, 0), sync()),
        },
        inner=3,
        rounds=15,
    )
    assert out.equal(src)
    gbps = {k: n * hidden * 2 / v / 1e9 for k, v in t.items()}
    print(
        f"read_into {BLOCKS} x {BLOCK_SIZE} x {hidden} bf16 on {device.type}, "
        f"{'scattered' if scattered else 'fresh'} blocks: "
        f"read_into {gbps['read_into']:.2f} GB/s, copy_ {gbps['copy_']:.2f} GB/s"
    )
    return t["copy_"] / t["read_into"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--hidden", type=count(1), default=4096)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=default_device().type,
        help="where the buffers live (default: cuda when present)",
    )
    parser.add_argument(
        "--threads",
        type=count(1, 1024),
        default=1,
        help="torch intra-op threads: one by default, so a busy neighbour process cannot "
        "turn the copies into many times slower ones",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = bench_allocator() + bench_read_into(args.hidden, torch.device(args.device))
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
