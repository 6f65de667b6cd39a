"""Two processes over gloo: the protocol against a plain send/recv of the same bytes.

    python benchmarks/bench_distributed.py [--check] [--tokens 50000] [--hidden 3584]
                                           [--pairs 15] [--pool-rounds 2]

Moves ``tokens`` x ``hidden`` bf16 embeddings (plus fill ids and mRoPE rows) from a
sender process to a receiver process in 8192-token rounds, and, in the same
processes and run, the same embedding bytes with one plain ``send``/``recv``.
Ratio = plain time / protocol time (1.0 = no overhead); target >= 0.85. Each
process uses half the CPUs' torch threads, for both paths alike, and each path
lands in a freshly allocated output, as an engine's would be.

The protocol's one extra cost is copying each landed round out of the blocks; the
next round is posted first, so the copy overlaps its transfer, and on a machine
with few cores that copy (first touches of the fresh output included) is the
critical path. The pairs alternate which path runs first, and the median of the
per-pair ratios is reported with its spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _flags import count  # benchmarks/ is on sys.path as the script's dir
from _timing import Row, report  # benchmarks/ is on sys.path as the script's dir

from resumekit.allocator import BlockAllocator, BlockBuffers
from resumekit.protocol import EmbeddingSender, ResumableReceiver
from resumekit.sim.simulate import random_source
from resumekit.sim.twoprocess import IDLE_WAIT, _free_port
from resumekit.transports.torch import TorchDistributedTransport

ROUND = 8192
# Each process gets its share of the CPUs: two processes with a full set of torch
# threads each oversubscribe the cores and starve gloo's I/O threads.
THREADS = max(1, (os.cpu_count() or 2) // 2)


def _main(
    rank: int, port: int, tokens: int, hidden: int, pairs: int, pool_rounds: int, out: Any
) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=300),
    )
    torch.set_num_threads(THREADS)
    source = random_source(tokens, hidden, seed=7)
    plain, protocol = [], []
    if rank == 0:
        # With room for two rounds the next is posted before this one is copied out;
        # with one, the copy-out and the next transfer take turns.
        allocator = BlockAllocator(pool_rounds * ROUND // 128, 128)
        buffers = BlockBuffers(allocator, hidden, device="cpu")
        transport = TorchDistributedTransport("receiver", 1, buffers=buffers, timeout=120)
        receiver = ResumableReceiver(buffers, transport, ROUND, max_resume_tokens=ROUND)
    else:
        transport = TorchDistributedTransport("sender", 0, timeout=120)
        sender = EmbeddingSender(transport)

    def run_plain() -> float:
        dist.barrier()
        if rank == 1:
            dist.send(source.embeddings, dst=0)
            return 0.0
        dst = torch.empty_like(source.embeddings)
        start = time.perf_counter()
        dist.recv(dst, src=1)
        return time.perf_counter() - start

    def run_protocol(rid: int) -> float:
        dist.barrier()
        if rank == 1:
            sender.add(rid, source)
            while rid in sender:
                if not sender.step():
                    transport.wait(IDLE_WAIT)
            return 0.0
        start = time.perf_counter()
        receiver.add(rid)
        while not receiver.poll(rid).terminal:
            if not receiver.step():
                transport.wait(IDLE_WAIT)
        result = receiver.take(rid)
        took = time.perf_counter() - start
        assert result.output is not None and result.output.equal(source), result.reason
        return took

    for i in range(pairs + 1):
        if i % 2:  # alternate which path goes first, so neither always follows the other
            took, elapsed = run_protocol(i), run_plain()
        else:
            elapsed, took = run_plain(), run_protocol(i)
        if i:  # the first pair warms up both paths
            plain.append(elapsed)
            protocol.append(took)
    dist.barrier()
    if rank == 0:
        # Each protocol run follows its own plain run: the median of those pairs' ratios
        # is robust to this machine's speed drifting during the benchmark.
        ratios = [p / q for p, q in zip(plain, protocol, strict=True)]
        ms = [(round(p * 1e3), round(q * 1e3)) for p, q in zip(plain, protocol, strict=True)]
        print(f"(plain, protocol) ms per pair: {ms}", flush=True)
        out.put((statistics.median(plain), statistics.median(protocol), ratios))
    transport.shutdown()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--tokens", type=count(1, 2**31 - 1), default=50_000)
    parser.add_argument("--hidden", type=count(1), default=3584)
    parser.add_argument("--pairs", type=count(3), default=15, help="timed pairs after a warm-up")
    parser.add_argument(
        "--pool-rounds", type=int, default=2, choices=(1, 2), help="rounds the pool holds"
    )
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_main,
            args=(r, port, args.tokens, args.hidden, args.pairs, args.pool_rounds, out),
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    plain, protocol, ratios = out.get()
    ratio = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    gbytes = args.tokens * args.hidden * 2 / 1e9
    print(
        f"{args.tokens} x {args.hidden} bf16 ({gbytes:.2f} GB) over gloo on loopback, median of "
        f"{args.pairs}: plain send/recv {plain * 1e3:.0f} ms ({gbytes / plain:.2f} GB/s), protocol "
        f"in {ROUND}-token rounds (pool of {args.pool_rounds}) {protocol * 1e3:.0f} ms "
        f"({gbytes / protocol:.2f} GB/s); "
        f"pair ratios {min(ratios):.2f} .. {max(ratios):.2f}, quartiles {q1:.2f} .. {q3:.2f}"
    )
    rows: list[Row] = [("plain / protocol time, median of pairs (>= 0.85)", ratio, ratio >= 0.85)]
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
