"""Two processes over the Mooncake transfer engine: the protocol against raw engine writes.

    python benchmarks/bench_mooncake.py [--check] [--tokens 50000] [--hidden 3584]
                                        [--pairs 15] [--pool-rounds 2] [--threads N]

Moves ``tokens`` x ``hidden`` bf16 embeddings (plus fill ids and mRoPE rows) from a
sender process to a receiver process through :class:`MooncakeTransport` in
8192-token rounds, and, between the same two processes and engines in the same run,
the same embedding bytes with one raw batched ``batch_transfer_sync_write`` into a
buffer the receiver registered beforehand. Ratio = raw time / protocol time (1.0 =
no overhead); target >= 0.85. The protocol over :class:`TorchDistributedTransport`
(gloo) runs in the same pairs and is printed beside it, against the same raw time.

Each pair runs the three paths, rotating which goes first; the first pair warms
up. The median of the per-pair ratios is reported with its quartiles.
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
from resumekit.statemachine.mooncake import MooncakeTransport, load_mooncake
from resumekit.twoprocess import IDLE_WAIT, _free_port

ROUND = 8192
PATHS = ("raw", "mooncake", "gloo")


def _main(  # noqa: PLR0915 - one process's whole benchmark, in order
    rank: int, ports: tuple[int, int, int], args: argparse.Namespace, threads: int, out: Any
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{ports[0]}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=600),
    )
    source = random_source(args.tokens, args.hidden, seed=7)
    zmq = (f"tcp://127.0.0.1:{ports[1]}", f"tcp://127.0.0.1:{ports[2]}")
    ends: dict[str, Any] = {}
    if rank == 0:
        receivers = {}
        for path in PATHS[1:]:
            allocator = BlockAllocator(args.pool_rounds * ROUND // 128, 128)
            buffers = BlockBuffers(allocator, args.hidden, device="cpu")
            if path == "mooncake":
                ends[path] = MooncakeTransport(
                    "receiver", listen=zmq[0], peer=zmq[1], buffers=buffers, timeout=120
                )
            else:
                ends[path] = TorchDistributedTransport("receiver", 1, buffers=buffers, timeout=120)
            receivers[path] = ResumableReceiver(buffers, ends[path], ROUND, max_resume_tokens=ROUND)
        # The raw path's landing buffer, registered once, as a pre-sized pool would be.
        raw = torch.empty_like(source.embeddings)
        engine = ends["mooncake"].engine
        engine.register_memory(raw.data_ptr(), raw.numel() * raw.element_size())
        port = ends["mooncake"].session.rsplit(":", 1)[1]
        dist.send(torch.tensor([raw.data_ptr(), int(port)], dtype=torch.int64), dst=1)
    else:
        ends["mooncake"] = MooncakeTransport("sender", listen=zmq[1], peer=zmq[0], timeout=120)
        ends["gloo"] = TorchDistributedTransport("sender", 0, timeout=120)
        senders = {path: EmbeddingSender(ends[path]) for path in PATHS[1:]}
        where = torch.zeros(2, dtype=torch.int64)
        dist.recv(where, src=0)
        engine = ends["mooncake"].engine
        nbytes = source.embeddings.numel() * source.embeddings.element_size()
        engine.register_memory(source.embeddings.data_ptr(), nbytes)
        target = f"127.0.0.1:{int(where[1])}"
        # One batch of round-sized pieces, as an engine's own writes would be.
        step = ROUND * args.hidden * 2
        offsets = list(range(0, nbytes, step))
        lengths = [min(step, nbytes - o) for o in offsets]

    def run_raw() -> float:
        dist.barrier()
        if rank == 1:
            start = time.perf_counter()
            base, dst = source.embeddings.data_ptr(), int(where[0])
            rc = engine.batch_transfer_sync_write(
                target, [base + o for o in offsets], [dst + o for o in offsets], lengths
            )
            assert rc == 0, rc
            took = time.perf_counter() - start
            dist.send(torch.tensor([took], dtype=torch.float64), dst=0)
            return 0.0
        sent = torch.zeros(1, dtype=torch.float64)
        dist.recv(sent, src=1)
        return float(sent[0])

    def run_protocol(path: str, rid: int) -> float:
        dist.barrier()
        transport = ends[path]
        if rank == 1:
            sender = senders[path]
            sender.add(rid, source)
            while rid in sender:
                if not sender.step():
                    transport.wait(IDLE_WAIT)
            return 0.0
        receiver = receivers[path]
        start = time.perf_counter()
        receiver.add(rid)
        while not receiver.poll(rid).terminal:
            if not receiver.step():
                transport.wait(IDLE_WAIT)
        result = receiver.take(rid)
        took = time.perf_counter() - start
        assert result.output is not None and result.output.equal(source), result.reason
        return took

    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(args.pairs + 1):
        order = PATHS[i % 3 :] + PATHS[: i % 3]  # rotate which path goes first
        got = {p: run_raw() if p == "raw" else run_protocol(p, i) for p in order}
        if i:
            for p in PATHS:
                times[p].append(got[p])
    dist.barrier()
    if rank == 0:
        assert raw.equal(source.embeddings)  # the raw path moved the same bytes
        out.put(times)
    for end in ends.values():
        end.shutdown()
    dist.destroy_process_group()


def _summary(name: str, raw: list[float], path: list[float]) -> tuple[float, str]:
    ratios = [r / p for r, p in zip(raw, path, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (
        f"  {name:9s} median {statistics.median(path) * 1e3:7.0f} ms; raw / it per pair: "
        f"median {statistics.median(ratios):.2f}, quartiles {q1:.2f} .. {q3:.2f}, "
        f"range {min(ratios):.2f} .. {max(ratios):.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--pairs", type=int, default=15, help="timed pairs after a warm-up")
    parser.add_argument(
        "--pool-rounds", type=int, default=2, choices=(1, 2), help="rounds the pool holds"
    )
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads"
    )
    args = parser.parse_args()
    if args.pairs < 3:
        parser.error("--pairs must be at least 3")
    load_mooncake()  # what to install, before any process starts
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    ports = (_free_port(), _free_port(), _free_port())
    procs = [ctx.Process(target=_main, args=(r, ports, args, args.threads, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(1200)
    if out.empty():
        print("bench_mooncake: a process failed", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = out.get()
    gbytes = args.tokens * args.hidden * 2 / 1e9
    raw = statistics.median(times["raw"])
    print(
        f"{args.tokens} x {args.hidden} bf16 ({gbytes:.2f} GB), two processes on loopback, "
        f"{args.pairs} pairs, {args.threads} torch threads each; raw batched engine write "
        f"median {raw * 1e3:.0f} ms ({gbytes / raw:.2f} GB/s); protocol in {ROUND}-token "
        f"rounds, pool of {args.pool_rounds}:"
    )
    ratio, line = _summary("mooncake", times["raw"], times["mooncake"])
    print(line)
    print(_summary("gloo", times["raw"], times["gloo"])[1])
    rows: list[Row] = [("raw / Mooncake protocol, median of pairs (>= 0.85)", ratio, ratio >= 0.85)]
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
