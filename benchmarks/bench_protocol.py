"""Protocol hot-path timing, each against a baseline measured in the same run.

    python benchmarks/bench_protocol.py [--check] [--hidden 3584] [--tokens 50000]

1. an idle event-loop iteration over 1000 in-flight requests (step + poll of each)
   vs a plain dict lookup per request;
2. one transition on the compiled table vs the same trigger on the transitions machine;
3. the per-request record's size, and that no cycle keeps it alive;
4. receiving 50,000 tokens x 3584 hidden (bf16) in 8192-token rounds vs one contiguous copy.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
import weakref
from collections.abc import Callable

import torch
from _flags import count  # benchmarks/ is on sys.path as the script's dir
from _timing import (
    Row,
    interleaved_medians,
    report,
)  # benchmarks/ is on sys.path as the script's dir

from resumekit.allocator.buffers import default_device
from resumekit.protocol.declaration import (
    TABLE,
    Event,
    Guard,
    ReferenceModel,
    TransferState,
    reference_machine,
)
from resumekit.sim.simulate import random_source
from resumekit.transports.inprocess import Loopback

IN_FLIGHT = 1000


def _nothing() -> None:
    """The baseline loop body of :func:`_grown`."""


def _grown(fn: Callable[[], None]) -> int:
    """Bytes traced memory grows over 100 calls of ``fn``, after 100 to warm up, with
    the cycle collector off (run mid-loop it frees and grows its own lists)."""
    gc.collect()
    gc.disable()
    try:
        tracemalloc.start()
        for _ in range(100):
            fn()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            fn()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    finally:
        gc.enable()
    return grown


def bench_idle_poll() -> list[Row]:
    pair = Loopback(pool_blocks=IN_FLIGHT, block_size=16, hidden=8, default_allocate=16)
    rids = [f"req-{i}" for i in range(IN_FLIGHT)]
    for rid in rids:
        pair.receiver.add(rid)
    pair.receiver.step()  # every request admitted, round 0 posted; the sender never answers
    assert all(pair.receiver.poll(rid) is TransferState.Transferring for rid in rids)
    receiver = pair.receiver
    poll, step = receiver.poll, receiver.step
    plain = {rid: TransferState.Transferring for rid in rids}

    def event_loop() -> None:
        step()
        for rid in rids:
            poll(rid)

    def dict_loop() -> None:
        for rid in rids:
            plain[rid]

    # What a loop calling nothing grows by is the measuring code's own (an int and a
    # tuple, 56 B): subtracted, so the count is the event loop's alone.
    grown = _grown(event_loop) - _grown(_nothing)
    t = interleaved_medians({"event loop": event_loop, "dict": dict_loop}, inner=50)
    per_request = t["event loop"] / IN_FLIGHT * 1e6
    ratio = t["event loop"] / t["dict"]
    print(
        f"idle iteration over {IN_FLIGHT} in-flight requests: {per_request:.3f} us per request, "
        f"{ratio:.2f}x a plain dict lookup; memory grown over 100 iterations: {grown} B"
    )
    return [
        ("idle step+poll per request, us (<= 1)", per_request, per_request <= 1.0),
        ("idle iterations allocate nothing, bytes (== 0)", float(grown), grown == 0),
    ]


def bench_transition() -> list[Row]:
    state, event = TransferState.Transferring, Event.LANDED
    table = TABLE

    def compiled() -> None:
        row = table[state][event]
        row.if_false  # noqa: B018 - the lookup is what is measured

    model = ReferenceModel()
    model.guard_values = {g: False for g in Guard}  # landed, not final: Transferring -> itself
    reference_machine(model, initial=state)
    trigger = model.trigger  # type: ignore[attr-defined]

    def reference() -> None:
        trigger("landed")

    t = interleaved_medians({"table": compiled, "transitions": reference}, inner=5000)
    table_us = t["table"] * 1e6
    speedup = t["transitions"] / t["table"]
    print(
        f"one transition: table {table_us:.3f} us, transitions {t['transitions'] * 1e6:.2f} us "
        f"({speedup:.0f}x)"
    )
    return [
        ("table transition, us (<= 1)", table_us, table_us <= 1.0),
        ("table speed-up over transitions (>= 10x)", speedup, speedup >= 10),
    ]


def bench_record() -> list[Row]:
    pair = Loopback(pool_blocks=IN_FLIGHT, block_size=16, hidden=8, default_allocate=16)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(IN_FLIGHT):
        pair.receiver.add(i)
    pair.receiver.step()  # admitted: each holds an allocation and a posted round
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # Everything the receiver keeps per request, minus what the transport queued.
    per_request = (after - before - _queued_bytes(pair)) / IN_FLIGHT
    rec = pair.receiver.record(0)
    ref = weakref.ref(rec)
    del rec
    pair.receiver.abort(0)
    pair.receiver.take(0)
    gc.disable()
    collected_without_gc = ref() is None  # refcounting alone freed it: no cycle
    gc.enable()
    print(f"per-request state: {per_request:.0f} B (record, allocation, index entries)")
    return [
        ("per-request state, bytes (<= 1024)", per_request, per_request <= 1024),
        (
            "record freed without the cycle collector",
            float(collected_without_gc),
            collected_without_gc,
        ),
    ]


def _queued_bytes(pair: Loopback) -> int:
    return sum(sys.getsizeof(p) + sys.getsizeof(p.blocks) for p in pair.transport.posts)


def bench_receive(tokens: int, hidden: int, device: torch.device) -> list[Row]:
    pair = Loopback(
        pool_blocks=8192 // 128,
        block_size=128,
        hidden=hidden,
        default_allocate=8192,
        max_resume_tokens=8192,
        device=device,
    )
    source = random_source(tokens, hidden, device=device)
    # CUDA copies are asynchronous: each timing waits for its own work to finish.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def receive_once(rid: int) -> float:
        pair.receiver.add(rid)
        pair.sender.add(rid, source)
        spent = 0.0
        while not pair.receiver.poll(rid).terminal:
            start = time.perf_counter()
            pair.receiver.step()
            sync()
            spent += time.perf_counter() - start
            pair.sender.step()
        result = pair.receiver.take(rid)
        assert result.output is not None and result.output.equal(source)
        return spent

    def contiguous_copy() -> float:
        start = time.perf_counter()
        dst = torch.empty_like(source.embeddings)
        dst.copy_(source.embeddings)
        sync()
        return time.perf_counter() - start

    receive_once(-1)
    samples: dict[str, list[float]] = {"receive": [], "copy": []}
    for i in range(5):
        samples["receive"].append(receive_once(i))
        samples["copy"].append(contiguous_copy())
    receive = sorted(samples["receive"])[2]
    copy = sorted(samples["copy"])[2]
    gbytes = tokens * hidden * 2 / 1e9
    ratio = copy / receive
    print(
        f"receive {tokens} x {hidden} bf16 on {device.type} in 8192-token rounds: "
        f"{gbytes / receive:.2f} GB/s "
        f"(receiver steps only); one contiguous copy: {gbytes / copy:.2f} GB/s"
    )
    return [("receive / contiguous copy bandwidth (>= 0.5)", ratio, ratio >= 0.5)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--hidden", type=count(1), default=3584)
    parser.add_argument("--tokens", type=count(1, 2**31 - 1), default=50_000)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=default_device().type,
        help="where the blocks live for the receive benchmark (default: cuda when present)",
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
    rows = bench_idle_poll() + bench_transition() + bench_record()
    rows += bench_receive(args.tokens, args.hidden, torch.device(args.device))
    return report(rows, args.check)


if __name__ == "__main__":
    sys.exit(main())
