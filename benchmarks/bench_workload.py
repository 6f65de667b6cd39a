"""One request trace on a virtual clock against each landing-buffer design.

    python benchmarks/bench_workload.py [--check] [--json FILE] [--plot FILE.png]
        [--requests 400] [--load 0.7] [--sweep 0.3,0.5,0.7,0.9,1.1] [--seed 0]
        [--seeds 0,1,2] [--window 3] [--sensitivity]
        [--pool-tokens 131072] [--block-size 128] [--trace NAME] [--design NAME]
        [--rtt-us 200] [--link-gbs 25] [--copy-gbs 500] [--round-us 50] [--hidden 3584]

Designs: ``resumekit`` (the real receiver, sender and allocator, 8192-token round
0), ``resumekit-auto`` (the same, round 0 learned per modality), ``size-first``
(upstream SGLang: ask the size, allocate exact bytes first-fit, wait on full, fail
on oversize) and ``one-resume`` (default buffer, then the whole rest at once,
holding round 0 while it waits). Traces (seeded): image-heavy, video-mixed (a
heavy tail to 200k tokens, some larger than the pool), adversarial (each size
just above the default); Poisson arrivals at ``--load`` times the link. See
``resumekit/sim/workload.py`` for the cost model. Prints the cost model, a table per
trace, p99 and throughput against load, and the issue's targets with what was
measured; ``--plot`` needs matplotlib (the ``plots`` extra). ``--trace`` and
``--design`` (repeatable) run only those; a target needing one left out is not shown.
The targets are judged on every seed of ``--seeds``: resumekit's p99 over the
requests size-first completes against size-first's, fixed and ``"auto"``; every
request completing; the rounds ``"auto"`` saves and the pool it occupies.
``--window`` is the resumekit designs' :class:`~resumekit.SchedulingPolicy` window
(0: no policy); ``--sensitivity`` judges the same targets again with each cost
constant halved and doubled. Every flag is checked before the run: a bad value
exits 2 naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _flags import count, output_file, positive  # benchmarks/ is on sys.path
from _timing import Row, report

from resumekit.errors import InvalidArgumentError
from resumekit.protocol.policy import SchedulingPolicy
from resumekit.protocol.sizing import round0_cap
from resumekit.sim.workload import (
    DESIGNS,
    TRACES,
    CostModel,
    Design,
    Result,
    Trace,
    check_pool,
    fewest_rounds,
    make_trace,
    quantile,
    run,
)

#: Where each constant of the default cost model comes from.
SOURCES = {
    "rtt": "200 us: a control message's round trip between two hosts of one cluster over "
    "ZMQ/TCP (a few tens of us on one host)",
    "link": "25 GB/s: one 200 Gb/s RDMA NIC's line rate (ConnectX-6/7, published); "
    "Mooncake over TCP on this machine's loopback moved 358 MB in 191 ms, 1.9 GB/s "
    "(docs/benchmarks.md)",
    "copy": "500 GB/s: a device-to-device copy on one GPU, a third of an H100's "
    "HBM3 copy bandwidth (published 3.35 TB/s read + write)",
    "round_overhead": "50 us: posting a round, its completion and bookkeeping (a "
    "Mooncake batch submit and poll, a receiver step)",
    "bytes_per_token": "7,184 B: bf16 x 3584 (Qwen2.5-VL-7B's hidden size), a fill id and "
    "three mRoPE rows",
}
FACTORS = (0.5, 2.0)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:9.2f}"


def _against(ours: Result, theirs: Result) -> float:
    """p99 of ``ours`` over the requests ``theirs`` completed, over p99 of ``theirs``."""
    common = set(ours.latencies) & set(theirs.latencies)
    a = quantile(sorted(ours.latencies[i] for i in common), 0.99)
    b = quantile(sorted(theirs.latencies[i] for i in common), 0.99)
    return float("inf") if a is None or not b else a / b


def _p99_over(ours: Result, theirs: Result) -> float:
    """p99 of ``ours`` over the requests ``theirs`` completed (NaN: none)."""
    common = set(ours.latencies) & set(theirs.latencies)
    value = quantile(sorted(ours.latencies[i] for i in common), 0.99)
    return float("nan") if value is None else value


def _seeded(
    traces: Sequence[Trace], seeds: list[int], common: dict[str, Any]
) -> dict[tuple[str, int], dict[str, Result]]:
    """resumekit, resumekit-auto and size-first on every trace and seed."""
    kept: tuple[Design, ...] = ("resumekit", "resumekit-auto", "size-first")
    out: dict[tuple[str, int], dict[str, Result]] = {}
    for trace in traces:
        for seed in seeds:
            out[trace, seed] = {d: run(d, trace, **{**common, "seed": seed}) for d in kept}
    return out


def _most_saved(trace: Trace, seed: int, common: dict[str, Any], fixed: Result) -> float:
    """The most rounds any round-0 sizing could save against ``fixed``: every request's
    round 0 as large as it needs, up to the auto sizer's cap (a floor no learner beats)."""
    pool, bs = common["pool_tokens"], common["block_size"]
    items = make_trace(trace, common["requests"], common.get("load", 0.7), common["cost"], seed)
    cap = round0_cap(pool, bs)
    floor = sum(
        fewest_rounds(it.tokens, cap, pool_tokens=pool, block_size=bs, policy=common["policy"])
        for it in items
    )
    return 1 - floor / len(items) / fixed.rounds


def _seed_rows(seeded: dict[tuple[str, int], dict[str, Result]], n: int) -> list[Row]:
    """The issue's targets, each at its worst seed."""
    rows: list[Row] = []
    least = min(r[d].completed for r in seeded.values() for d in ("resumekit", "resumekit-auto"))
    rows.append(("every request completes: fewest, any trace and seed", least, least == n))
    for trace in dict.fromkeys(t for t, _ in seeded):
        for d, name in (("resumekit", "fixed"), ("resumekit-auto", "auto")):
            worst = max(
                _against(r[d], r["size-first"]) for (t, _), r in seeded.items() if t == trace
            )
            rows.append(
                (f"{trace} p99* / size-first, {name}, worst seed (<= 1)", worst, worst <= 1)
            )
    video = [r for (t, _), r in seeded.items() if t == "video-mixed"]
    if video:
        saved = min(1 - r["resumekit-auto"].rounds / r["resumekit"].rounds for r in video)
        rows.append(("video-mixed rounds saved by auto, worst seed (>= 0.30)", saved, saved >= 0.3))
        occ = max(r["resumekit-auto"].occupancy / r["resumekit"].occupancy for r in video)
        rows.append(("video-mixed occupancy auto / fixed, worst (<= 1.25)", occ, occ <= 1.25))
    return rows


def _print_seeded(
    seeded: dict[tuple[str, int], dict[str, Result]], load: float, common: dict[str, Any]
) -> None:
    print(f"\nby seed at load {load:g}: p99* = p99 over the requests size-first completes")
    print(
        f"  {'trace':12s} {'seed':>4s} {'fixed/sf':>8s} {'auto/sf':>8s} {'done':>11s} "
        f"{'sf done':>7s} {'rounds':>11s} {'saved':>6s} {'at most':>7s} {'occ a/f':>7s}"
    )
    for (trace, seed), r in seeded.items():
        fixed, auto, sf = r["resumekit"], r["resumekit-auto"], r["size-first"]
        most = _most_saved(trace, seed, common, fixed)  # type: ignore[arg-type]
        print(
            f"  {trace:12s} {seed:4d} {_against(fixed, sf):8.2f} {_against(auto, sf):8.2f} "
            f"{fixed.completed:5d}/{auto.completed:5d} {sf.completed:7d} "
            f"{fixed.rounds:5.2f}/{auto.rounds:5.2f} {1 - auto.rounds / fixed.rounds:6.1%} "
            f"{most:7.1%} {auto.occupancy / fixed.occupancy:7.2f}"
        )
    print(
        "  at most: the rounds auto could save if every round 0 were sized to its request, "
        f"up to the sizer's cap ({round0_cap(common['pool_tokens'], common['block_size']):,} "
        "tokens, a quarter of the pool)"
    )


def _sensitivity(
    traces: Sequence[Trace],
    seeds: list[int],
    common: dict[str, Any],
    n: int,
    baseline: list[Row],
) -> list[Row]:
    """The targets again with each cost constant halved and doubled.

    The conclusions hold when every target keeps its verdict (met or missed) of the
    default cost model; each measured value is printed beside its label.
    """
    base: CostModel = common["cost"]
    verdicts = {label: ok for label, _, ok in baseline}
    rows: list[Row] = []
    print("\nsensitivity: each target (worst seed) with one cost constant halved or doubled")
    labels = [label for label, _, _ in baseline]
    print("  " + " | ".join(f"{i + 1}: {label}" for i, label in enumerate(labels)))
    print(f"  {'default':22s} " + " ".join(f"{v:6.2f}" for _, v, _ in baseline))
    for name in SOURCES:
        for factor in FACTORS:
            value = getattr(base, name) * factor
            if name == "bytes_per_token":
                value = round(value)
            cost = dataclasses.replace(base, **{name: value})
            got = _seed_rows(_seeded(traces, seeds, {**common, "cost": cost}), n)
            changed = [i + 1 for i, (label, _, ok) in enumerate(got) if verdicts[label] != ok]
            print(
                f"  {name + ' x' + format(factor, 'g'):22s} "
                + " ".join(f"{v:6.2f}" for _, v, _ in got)
                + (f"  verdict changed: {changed}" if changed else "  same verdicts")
            )
            rows.append(
                (f"sensitivity {name} x{factor:g}: verdicts changed", len(changed), not changed)
            )
    return rows


def _common_p99(results: list[Result]) -> dict[str, float | None]:
    """p99 of each design over the requests every design completed."""
    common = set.intersection(*(set(r.latencies) for r in results))
    return {r.design: quantile(sorted(r.latencies[i] for i in common), 0.99) for r in results}


def _loads(text: str) -> list[float]:
    """``--sweep``: one or more loads, comma-separated, each a finite number > 0."""
    loads = [positive(x.strip()) for x in text.split(",") if x.strip()]
    if not loads:
        raise argparse.ArgumentTypeError("needs at least one load")
    return loads


def _seeds(text: str) -> list[int]:
    """``--seeds``: one or more seeds, comma-separated, each an int >= 0."""
    seeds = [count(0)(x.strip()) for x in text.split(",") if x.strip()]
    if not seeds:
        raise argparse.ArgumentTypeError("needs at least one seed")
    return seeds


def _cost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CostModel:
    """The cost model of the flags; a field CostModel refuses exits 2 naming its flag."""
    fields = {
        "rtt": ("--rtt-us", args.rtt_us * 1e-6),
        "link": ("--link-gbs", args.link_gbs * 1e9),
        "copy": ("--copy-gbs", args.copy_gbs * 1e9),
        "round_overhead": ("--round-us", args.round_us * 1e-6),
        "bytes_per_token": ("--hidden", args.hidden * 2 + 16),
    }
    for name, (flag, value) in fields.items():
        try:
            CostModel(**{name: value})
        except InvalidArgumentError as error:
            parser.error(f"argument {flag}: {error}")
    return CostModel(**{name: value for name, (_, value) in fields.items()})


def _check_pool(
    parser: argparse.ArgumentParser, args: argparse.Namespace, designs: Sequence[Design]
) -> None:
    """Exit 2 naming --pool-tokens or --block-size unless every design runs in that pool."""
    for design in designs:
        try:
            check_pool(design, args.pool_tokens, args.block_size)
        except InvalidArgumentError as error:
            flag = "--block-size" if str(error).startswith("block_size") else "--pool-tokens"
            parser.error(f"argument {flag}: {error}")


def _parser() -> argparse.ArgumentParser:
    """The flags, each typed so that a bad value exits 2 naming it before any work."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--json", metavar="FILE", type=output_file, help="write every result as JSON"
    )
    parser.add_argument(
        "--plot", metavar="FILE", type=output_file, help="latency CDFs and p99 against load (PNG)"
    )
    parser.add_argument("--requests", type=count(10), default=400)
    parser.add_argument("--load", type=positive, default=0.7, help="offered load, x the link")
    parser.add_argument(
        "--sweep", type=_loads, default=[0.3, 0.5, 0.7, 0.9, 1.1], help="loads for p99 vs load"
    )
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument(
        "--seeds", type=_seeds, default=[0, 1, 2], help="seeds the targets are judged on"
    )
    parser.add_argument(
        "--window",
        type=count(0),
        default=3,
        help="rounds in flight of resumekit's scheduling policy (0: no policy)",
    )
    parser.add_argument(
        "--sensitivity", action="store_true", help="judge again with each constant x0.5, x2"
    )
    parser.add_argument("--pool-tokens", type=count(1), default=131_072)
    parser.add_argument("--block-size", type=count(1), default=128)
    parser.add_argument(
        "--trace", action="append", choices=TRACES, help="a trace to run (repeatable; default: all)"
    )
    parser.add_argument(
        "--design",
        action="append",
        choices=DESIGNS,
        help="a design to run (repeatable; default: all)",
    )
    parser.add_argument("--rtt-us", type=positive, default=200.0)
    parser.add_argument("--link-gbs", type=positive, default=25.0, help="GB/s")
    parser.add_argument("--copy-gbs", type=positive, default=500.0, help="GB/s")
    parser.add_argument("--round-us", type=positive, default=50.0)
    parser.add_argument("--hidden", type=count(1), default=3584, help="bf16 values per token")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    traces = [t for t in TRACES if args.trace is None or t in args.trace]
    designs = [d for d in DESIGNS if args.design is None or d in args.design]
    cost = _cost(parser, args)
    _check_pool(parser, args, designs)
    sweep: list[float] = args.sweep
    policy = SchedulingPolicy(max_rounds_in_flight=args.window) if args.window else None
    common = {"requests": args.requests, "cost": cost, "seed": args.seed, "policy": policy}
    common |= {"pool_tokens": args.pool_tokens, "block_size": args.block_size}
    print(
        f"cost model: rtt {args.rtt_us:g} us, link {args.link_gbs:g} GB/s, copy-out "
        f"{args.copy_gbs:g} GB/s, {args.round_us:g} us per round, {cost.bytes_per_token} "
        f"bytes per token; pool {args.pool_tokens:,} tokens "
        f"({args.pool_tokens * cost.bytes_per_token / 2**30:.2f} GiB) for every design; "
        f"{args.requests} requests per trace, seed {args.seed}; resumekit's policy: "
        + (f"{args.window} rounds in flight, bulk above the pool" if policy else "none")
    )
    for name, source in SOURCES.items():
        print(f"  {name}: {source}")
    main_results: dict[str, dict[str, Result]] = {}
    for trace in traces:
        results: dict[str, Result] = {d: run(d, trace, load=args.load, **common) for d in designs}
        main_results[trace] = results
        both = _common_p99(list(results.values()))
        print(f"\n{trace} at load {args.load:g}")
        print(
            f"  {'design':15s} {'done':>5s} {'fail':>5s} {'stuck':>5s} {'p50 ms':>9s} "
            f"{'p99 ms':>9s} {'max ms':>9s} {'p99*':>9s} {'tok/s':>10s} {'occ':>5s} "
            f"{'waste':>5s} {'frag':>5s} {'rounds':>6s} {'wait99':>9s}"
        )
        for d, r in results.items():
            print(
                f"  {d:15s} {r.completed:5d} {r.failed:5d} {r.stuck:5d} {_ms(r.p50)} "
                f"{_ms(r.p99)} {_ms(r.max)} {_ms(both[d])} {r.throughput:10.3g} "
                f"{r.occupancy:5.2f} {r.waste:5.2f} {r.fragmentation:5.2f} {r.rounds:6.2f} "
                f"{_ms(r.wait_p99)}"
            )
        for d, r in results.items():
            if r.failures:
                print(f"  {d} failures: {r.failures}")
    if "video-mixed" in traces:
        inside = {
            d: run(d, "video-mixed", load=args.load, within_pool=True, **common) for d in designs
        }
        print("\nvideo-mixed without the requests larger than the pool (diagnostic, every design)")
        for d, r in inside.items():
            print(
                f"  {d:15s} {r.completed:5d} done, p50 {_ms(r.p50).strip()} ms, p99 "
                f"{_ms(r.p99).strip()} ms, rounds {r.rounds:.2f}, occupancy {r.occupancy:.2f}"
            )
    print("\n  p99*: over the requests every design completed. occ: mean fraction of the pool")
    print("  allocated; waste: allocated but never written; frag: 1 - largest free run / free")
    sweeps: dict[str, dict[str, list[Result]]] = {}
    print("\np99 ms (throughput, tokens/s) against load")
    for trace in traces:
        sweeps[trace] = {d: [run(d, trace, load=x, **common) for x in sweep] for d in designs}
        print(f"  {trace}: loads {', '.join(f'{x:g}' for x in sweep)}")
        for name, rs in sweeps[trace].items():
            cells = ", ".join(f"{_ms(r.p99).strip()} ({r.throughput:.3g})" for r in rs)
            best = max(r.throughput for r in rs)
            print(f"    {name:15s} {cells}; at saturation {best:.3g} tok/s")
    rows = _targets(main_results, args.requests)
    judged = {"resumekit", "resumekit-auto", "size-first"} <= set(designs)
    if judged:
        seeded = _seeded(traces, args.seeds, {**common, "load": args.load})
        _print_seeded(seeded, args.load, {**common, "load": args.load})
        seed_rows = _seed_rows(seeded, args.requests)
        rows += seed_rows
        if args.sensitivity:
            rows += _sensitivity(
                traces, args.seeds, {**common, "load": args.load}, args.requests, seed_rows
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cost": asdict(cost),
                    "load": args.load,
                    "results": {
                        t: {d: r.to_dict() for d, r in rs.items()} for t, rs in main_results.items()
                    },
                    "sweep": {
                        t: {d: [r.to_dict() for r in rs] for d, rs in ds.items()}
                        for t, ds in sweeps.items()
                    },
                },
                f,
            )
    if args.plot:
        _plot(args.plot, main_results, sweeps, sweep)
    return report(rows, args.check)


def _targets(results: dict[str, dict[str, Result]], n: int) -> list[Row]:
    """The issue's targets that the traces and designs run can measure."""
    image = results.get("image-heavy", {})
    rows: list[Row] = []
    if results and all("resumekit" in r for r in results.values()):
        least = min(r["resumekit"].completed for r in results.values())
        rows.append(("resumekit completes every request, fewest of any trace", least, least == n))
    if "resumekit" in image and "size-first" in image:
        p50 = (image["resumekit"].p50 or 0.0) / (image["size-first"].p50 or 1.0)
        rows.append(("image-heavy p50: resumekit / size-first (<= 1.10)", p50, p50 <= 1.10))
    return rows


def _plot(
    path: Path,
    results: dict[str, dict[str, Result]],
    sweeps: dict[str, dict[str, list[Result]]],
    loads: list[float],
) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("--plot needs matplotlib: pip install 'resumekit[plots]'", file=sys.stderr)
        return
    traces = list(results)
    fig, axes = plt.subplots(2, len(traces), figsize=(5 * len(traces), 8), squeeze=False)
    for col, trace in enumerate(traces):
        ax: Any = axes[0][col]
        for d, r in results[trace].items():
            lat = sorted(v * 1e3 for v in r.latencies.values())
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=d)
        ax.set(xscale="log", xlabel="latency ms", ylabel="fraction done", title=trace)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ref = sweeps[trace].get("size-first")
        for d, rs in sweeps[trace].items():
            ys = [_p99_over(r, ref[k] if ref else r) * 1e3 for k, r in enumerate(rs)]
            ax.plot(loads, ys, marker="o", label=d)
        what = "p99 ms, requests size-first completes" if ref else "p99 ms"
        ax.set(yscale="log", xlabel="offered load (x link)", ylabel=what)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
