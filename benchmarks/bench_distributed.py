"""Two processes over gloo: the protocol against a plain send/recv of the same bytes.

    python benchmarks/bench_distributed.py [--check] [--tokens 50000] [--hidden 3584]

Moves ``tokens`` x ``hidden`` bf16 embeddings (plus fill ids and mRoPE rows) from a
sender process to a receiver process in 8192-token rounds, and, in the same
processes and run, the same embedding bytes with one plain ``send``/``recv``.
Ratio = plain time / protocol time (1.0 = no overhead); target >= 0.85. Each
process uses half the CPUs' torch threads, for both paths alike.
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
from _timing import Row, report  # benchmarks/ is on sys.path as the script's dir

from resumekit.allocator import BlockAllocator, BlockBuffers
from resumekit.simulate import random_source
from resumekit.statemachine import EmbeddingSender, ResumableReceiver
from resumekit.statemachine.distributed import TorchDistributedTransport
from resumekit.twoprocess import IDLE_WAIT, _free_port

ROUND = 8192
REPEATS = 9
# Each process gets its share of the CPUs: two processes with a full set of torch
# threads each oversubscribe the cores and starve gloo's I/O threads.
THREADS = max(1, (os.cpu_count() or 2) // 2)


def _main(rank: int, port: int, tokens: int, hidden: int, out: Any) -> None:
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
        # Room for two rounds: the next round is posted before this one is copied out.
        allocator = BlockAllocator(2 * ROUND // 128, 128)
        buffers = BlockBuffers(allocator, hidden, device="cpu")
        transport = TorchDistributedTransport("receiver", 1, buffers=buffers, timeout=120)
        receiver = ResumableReceiver(buffers, transport, ROUND, max_resume_tokens=ROUND)
    else:
        transport = TorchDistributedTransport("sender", 0, timeout=120)
        sender = EmbeddingSender(transport)
    for i in range(REPEATS + 1):
        dist.barrier()
        if rank == 0:
            dst = torch.empty_like(source.embeddings)
            start = time.perf_counter()
            dist.recv(dst, src=1)
            elapsed = time.perf_counter() - start
        else:
            dist.send(source.embeddings, dst=0)
        dist.barrier()
        if rank == 0:
            start = time.perf_counter()
            receiver.add(i)
            while not receiver.poll(i).terminal:
                if not receiver.step():
                    transport.wait(IDLE_WAIT)
            result = receiver.take(i)
            took = time.perf_counter() - start
            assert result.output is not None and result.output.equal(source), result.reason
            if i:  # the first run warms up both paths
                plain.append(elapsed)
                protocol.append(took)
        else:
            sender.add(i, source)
            while i in sender:
                if not sender.step():
                    transport.wait(IDLE_WAIT)
    dist.barrier()
    if rank == 0:
        # Each protocol run follows its own plain run: the median of those pairs' ratios
        # is robust to this machine's speed drifting during the benchmark.
        ratios = [p / q for p, q in zip(plain, protocol, strict=True)]
        pairs = [(round(p * 1e3), round(q * 1e3)) for p, q in zip(plain, protocol, strict=True)]
        print(f"(plain, protocol) ms per pair: {pairs}", flush=True)
        out.put((statistics.median(plain), statistics.median(protocol), statistics.median(ratios)))
    transport.shutdown()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--hidden", type=int, default=3584)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_main, args=(r, port, args.tokens, args.hidden, out)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    plain, protocol, ratio = out.get()
    gbytes = args.tokens * args.hidden * 2 / 1e9
    print(
        f"{args.tokens} x {args.hidden} bf16 ({gbytes:.2f} GB) over gloo on loopback, median of "
        f"{REPEATS}: plain send/recv {plain * 1e3:.0f} ms ({gbytes / plain:.2f} GB/s), protocol "
        f"in {ROUND}-token rounds {protocol * 1e3:.0f} ms ({gbytes / protocol:.2f} GB/s)"
    )
    rows: list[Row] = [("plain / protocol time, median of pairs (>= 0.85)", ratio, ratio >= 0.85)]
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
