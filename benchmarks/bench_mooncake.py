"""Two processes over the Mooncake transfer engine: the protocol against raw engine writes.

    python benchmarks/bench_mooncake.py [--check] [--tokens 50000] [--hidden 3584]
                                        [--pairs 15] [--pool-rounds 2] [--threads N] [--thp]

Moves ``tokens`` x ``hidden`` bf16 embeddings (plus fill ids and mRoPE rows) from a
sender process to a receiver process through :class:`MooncakeTransport` in
8192-token rounds, and, between the same two processes and engines in the same run,
the same embedding bytes raw, in round-sized pieces into a buffer the receiver
registered beforehand, two ways: one ``batch_transfer_sync_write`` (the engine
spins on the batch's status) and, as the transport writes, one
``batch_transfer_async_write`` per piece, all submitted, then polled with the
transport's sleep between looks. Ratio = raw time / protocol time (1.0 = no
overhead), per pair, against each raw way; target >= 0.85. The protocol over
:class:`TorchDistributedTransport` (gloo) runs in the same pairs and is printed
beside it, against the same raw time, and so does the Mooncake protocol with its
outputs from a cache (``mooncake-cached``: the copy-out writes memory touched
before, as it would with CUDA's caching allocator; printed, not judged).

Each pair runs the five paths, rotating which goes first; the first pair warms
up. The median of the per-pair ratios is reported with its quartiles.

Each path's CPU time (both processes, every thread: the engine's, ZMQ's, gloo's)
is measured too. No run can take less wall time than its CPU time over the
machine's CPUs, so ``raw time x CPUs / protocol CPU`` is a ceiling on the ratio
that this machine allows; it is printed beside the ratio. The receiver's copy-out
of one round is also timed alone, into fresh and into touched memory: the
difference is the first touch of the output's pages.
"""

from __future__ import annotations

import argparse
import os
import resource
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

from resumekit.allocator import BlockAllocator, BlockBuffers, EmbeddingTensors
from resumekit.protocol import EmbeddingSender, ResumableReceiver
from resumekit.sim.simulate import random_source
from resumekit.sim.twoprocess import IDLE_WAIT, _free_port
from resumekit.transports.mooncake import MooncakeTransport, load_mooncake
from resumekit.transports.mooncake.sender import _WRITE_POLL_S
from resumekit.transports.torch import TorchDistributedTransport

ROUND = 8192
PATHS = ("raw", "raw-polled", "mooncake", "mooncake-cached", "gloo")
RAWS = PATHS[:2]
PROTOCOLS = ("mooncake", "gloo")  # each has its own transport pair and receiver


class _CachedOutputs(BlockBuffers):
    """Buffers whose outputs come from a cache while ``cached`` is set, as a caching
    allocator's (CUDA's) would: the copy-out then writes memory touched before. Safe
    here because each output is checked and dropped before the next request."""

    cached = False
    _kept: dict[int, EmbeddingTensors] | None = None

    def new_output(self, num_tokens: int) -> EmbeddingTensors:
        if not self.cached:
            return super().new_output(num_tokens)
        if self._kept is None:
            self._kept = {}
        if num_tokens not in self._kept:
            self._kept[num_tokens] = super().new_output(num_tokens)
        return self._kept[num_tokens]


def _cpu() -> float:
    """CPU seconds this process has used, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _copy_out_ms(hidden: int) -> tuple[float, float]:
    """Median ms to copy one landed round out, into a fresh output and into touched memory."""
    allocator = BlockAllocator(ROUND // 128, 128)
    buffers = BlockBuffers(allocator, hidden, device="cpu")
    allocation = allocator.allocate(ROUND, "copy-out")
    assert allocation is not None
    touched = buffers.new_output(ROUND)
    touched.embeddings.zero_()
    fresh: list[float] = []
    warm: list[float] = []
    for _ in range(9):
        out = buffers.new_output(ROUND)
        start = time.perf_counter()
        buffers.read_into(allocation, ROUND, out, 0)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        buffers.read_into(allocation, ROUND, touched, 0)
        warm.append(time.perf_counter() - start)
    return statistics.median(fresh) * 1e3, statistics.median(warm) * 1e3


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
        receivers: dict[str, ResumableReceiver] = {}
        for path in PROTOCOLS:
            allocator = BlockAllocator(args.pool_rounds * ROUND // 128, 128)
            buffers = _CachedOutputs(allocator, args.hidden, device="cpu")
            if path == "mooncake":
                ends[path] = MooncakeTransport(
                    "receiver", listen=zmq[0], peer=zmq[1], buffers=buffers, timeout=120
                )
            else:
                ends[path] = TorchDistributedTransport("receiver", 1, buffers=buffers, timeout=120)
            receivers[path] = ResumableReceiver(buffers, ends[path], ROUND, max_resume_tokens=ROUND)
        receivers["mooncake-cached"] = receivers["mooncake"]
        # The raw path's landing buffer, registered once, as a pre-sized pool would be.
        raw = torch.empty_like(source.embeddings)
        engine = ends["mooncake"].engine
        engine.register_memory(raw.data_ptr(), raw.numel() * raw.element_size())
        port = ends["mooncake"].session.rsplit(":", 1)[1]
        dist.send(torch.tensor([raw.data_ptr(), int(port)], dtype=torch.int64), dst=1)
    else:
        ends["mooncake"] = MooncakeTransport("sender", listen=zmq[1], peer=zmq[0], timeout=120)
        ends["gloo"] = TorchDistributedTransport("sender", 0, timeout=120)
        senders = {path: EmbeddingSender(ends[path]) for path in PROTOCOLS}
        senders["mooncake-cached"] = senders["mooncake"]
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

    def run_raw(polled: bool) -> float:
        dist.barrier()
        cpu[0] = _cpu()
        if rank == 1:
            start = time.perf_counter()
            base, dst = source.embeddings.data_ptr(), int(where[0])
            locals_, remotes = [base + o for o in offsets], [dst + o for o in offsets]
            if polled:  # one batch per piece: transfer_check_status sees a batch's first only
                batches = [
                    engine.batch_transfer_async_write(target, [a], [b], [n])
                    for a, b, n in zip(locals_, remotes, lengths, strict=True)
                ]
                for batch in batches:
                    assert batch not in (0, 2**64 - 1)
                    while (rc := engine.transfer_check_status(batch)) == 0:
                        time.sleep(_WRITE_POLL_S)
                    assert rc == 1, rc
            else:
                rc = engine.batch_transfer_sync_write(target, locals_, remotes, lengths)
                assert rc == 0, rc
            took = time.perf_counter() - start
            cpu[1] = _cpu()
            dist.send(torch.tensor([took], dtype=torch.float64), dst=0)
            return 0.0
        sent = torch.zeros(1, dtype=torch.float64)
        dist.recv(sent, src=1)
        cpu[1] = _cpu()
        return float(sent[0])

    ends["mooncake-cached"] = ends["mooncake"]

    def run_protocol(path: str, rid: int) -> float:
        dist.barrier()
        cpu[0] = _cpu()
        transport = ends[path]
        if rank == 1:
            sender = senders[path]
            sender.add(rid, source)
            while rid in sender:
                if not sender.step():
                    transport.wait(IDLE_WAIT)
            cpu[1] = _cpu()
            return 0.0
        receiver = receivers[path]
        buffers = receiver.buffers
        assert isinstance(buffers, _CachedOutputs)
        buffers.cached = path == "mooncake-cached"
        start = time.perf_counter()
        receiver.add(rid)
        while not receiver.poll(rid).terminal:
            if not receiver.step():
                transport.wait(IDLE_WAIT)
        result = receiver.take(rid)
        took = time.perf_counter() - start
        cpu[1] = _cpu()
        assert result.output is not None and result.output.equal(source), result.reason
        return took

    cpu = [0.0, 0.0]  # this process's CPU seconds when the path began and ended
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    cpus: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(args.pairs + 1):
        k = i % len(PATHS)
        for p in PATHS[k:] + PATHS[:k]:  # rotate which path goes first
            took = run_raw(p == "raw-polled") if p in RAWS else run_protocol(p, i)
            if i:
                times[p].append(took)
                cpus[p].append(cpu[1] - cpu[0])
    mine = torch.tensor([cpus[p] for p in PATHS], dtype=torch.float64)
    if rank == 1:
        dist.send(mine, dst=0)
    else:
        theirs = torch.zeros_like(mine)
        dist.recv(theirs, src=1)
        both = (mine + theirs).tolist()
        assert raw.equal(source.embeddings)  # the raw path moved the same bytes
        out.put((times, {p: both[k] for k, p in enumerate(PATHS)}))
    for end in ends.values():
        end.shutdown()
    dist.destroy_process_group()


def _summary(
    name: str, raw: list[float], path: list[float], cpu: list[float], cpus: int
) -> tuple[float, str]:
    ratios = [r / p for r, p in zip(raw, path, strict=True)]
    ceilings = [r * cpus / c for r, c in zip(raw, cpu, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (
        f"  {name:29s} median {statistics.median(ratios):.2f}, quartiles {q1:.2f} .. {q3:.2f}, "
        f"range {min(ratios):.2f} .. {max(ratios):.2f}; "
        f"ceiling on {cpus} CPUs {statistics.median(ceilings):.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--tokens", type=count(1, 2**31 - 1), default=50_000)
    parser.add_argument("--hidden", type=count(1), default=3584)
    parser.add_argument("--pairs", type=count(3), default=15, help="timed pairs after a warm-up")
    parser.add_argument(
        "--pool-rounds", type=int, default=2, choices=(1, 2), help="rounds the pool holds"
    )
    parser.add_argument(
        "--threads",
        type=count(1, 1024),
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads",
    )
    parser.add_argument(
        "--thp",
        action="store_true",
        help="THP_MEM_ALLOC_ENABLE=1 in both processes: torch backs big CPU tensors "
        "with huge pages, so the first touch of a fresh output costs less",
    )
    args = parser.parse_args()
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # the spawned processes read it at start
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
    times, cpu = out.get()
    gbytes = args.tokens * args.hidden * 2 / 1e9
    cpus = len(os.sched_getaffinity(0))
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print(
        f"{args.tokens} x {args.hidden} bf16 ({gbytes:.2f} GB), two processes on loopback, "
        f"{cpus} CPUs, {args.pairs} pairs, {args.threads} torch threads each, "
        f"THP_MEM_ALLOC_ENABLE {thp}. Median time and CPU (both processes) per path:"
    )
    how = {
        "raw": "one batch_transfer_sync_write of round-sized pieces (the engine spins)",
        "raw-polled": "one async write per piece, all in flight at once, polled with sleeps",
        "mooncake": f"the protocol in {ROUND}-token rounds, pool of {args.pool_rounds}",
        "mooncake-cached": "the same, its outputs from a cache (as CUDA's allocator's are)",
        "gloo": "the same protocol over TorchDistributedTransport",
    }
    for name in PATHS:
        took = statistics.median(times[name])
        print(
            f"  {name:15s} {took * 1e3:4.0f} ms ({gbytes / took:.2f} GB/s), "
            f"CPU {statistics.median(cpu[name]) * 1e3:4.0f} ms: {how[name]}"
        )
    print("raw / protocol per pair:")
    rows: list[Row] = []
    for path in PATHS[2:]:
        for raw in RAWS:
            ratio, line = _summary(f"{raw} / {path}", times[raw], times[path], cpu[path], cpus)
            print(line)
            if path == "mooncake":
                rows.append((f"{raw} / Mooncake protocol, median (>= 0.85)", ratio, ratio >= 0.85))
    torch.set_num_threads(args.threads)
    fresh, warm = _copy_out_ms(args.hidden)
    pages = ROUND * args.hidden * 2 / resource.getpagesize()  # a round's bf16 embeddings
    print(
        f"  copy-out of one {ROUND}-token round alone: {fresh:.1f} ms into a fresh output, "
        f"{warm:.1f} ms into touched memory: {(fresh - warm) * 1e3 / pages:.2f} us per first "
        f"touch of a {resource.getpagesize() // 1024} KiB page"
    )
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
