"""resumekit's vLLM connector side by side with vLLM's own ECMooncakeConnector, one trace.

Each design runs as two processes, an encode instance and a language instance, each
vLLM 0.34's real Scheduler with the worker-side glue (``resumekit.sim.vllm``), over
Mooncake on TCP loopback; both are given the same landing memory, smaller than the
burst. Requests arrive on a seeded Poisson clock and go to both instances at once (a
proxy that does not wait for the encoder). Printed per design: requests completed and
failed (with vLLM's finish reason and the connector's own words), p50/p99 time from
arrival to the embedding in the encoder cache, the landing memory at its peak, and the
throughput (embedding bytes over wall time) over the requests both designs complete.

    python benchmarks/bench_vllm.py [--trace image-heavy|video-mixed|both] [--seed 0] [--check]

Token counts are Qwen2.5-VL's: an image of H x W pixels takes ceil(H/28) * ceil(W/28)
tokens (14-pixel patches merged 2x2); a video sampled at 2 frames per second takes
ceil(H/28) * ceil(W/28) / 2 tokens per frame (two frames to a temporal patch). The
embedding width is a flag (3584 for the 7B model; smaller by default, so that a
two-CPU machine moves the trace in minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _flags import count, output_file, positive  # benchmarks/ is on sys.path

IMAGE_SIZES = [(448, 448), (640, 480), (896, 896), (1024, 768), (1280, 720), (1920, 1080)]
VIDEO_SIZES = [(448, 448), (640, 360), (854, 480)]
MAX_VIDEO_TOKENS = 200_000


def image_tokens(h: int, w: int) -> int:
    return math.ceil(h / 28) * math.ceil(w / 28)


def video_tokens(h: int, w: int, seconds: float) -> int:
    frames = max(2, round(2 * seconds))
    return min(MAX_VIDEO_TOKENS, math.ceil(h / 28) * math.ceil(w / 28) * frames // 2)


@dataclass
class Arrival:
    at: float  # seconds after the start
    request: str
    kind: str
    tokens: int


def trace(kind: str, n: int, rate: float, seed: int) -> list[Arrival]:
    """``n`` requests of one item each, Poisson at ``rate`` per second."""
    rng = random.Random(f"{kind}-{seed}")
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        if kind == "video-mixed" and rng.random() < 0.4:
            h, w = rng.choice(VIDEO_SIZES)
            seconds = 10 * rng.paretovariate(1.2)  # a long tail, up to the cap
            out.append(Arrival(t, f"r{i}", "video", video_tokens(h, w, seconds)))
        else:
            h, w = rng.choice(IMAGE_SIZES)
            out.append(Arrival(t, f"r{i}", "image", image_tokens(h, w)))
    return out


def free_port(span: int = 4) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + 200 + span < 65535:
            return base
    raise RuntimeError("no free port")


# -- one instance, in its own process ------------------------------------------------------


class _Reasons(logging.Handler):
    """Keeps what the connectors log about failures (vLLM's finish reason says only ERROR)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:200])


def serve(spec: dict[str, Any]) -> None:
    """One instance: wait for the start, add each arrival on time, step until all are done."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    import torch

    torch.set_num_threads(1)  # two processes share two CPUs
    from resumekit.sim.vllm import Instance, Item

    reasons = _Reasons()
    for name in ("vllm", "resumekit"):
        logging.getLogger(name).addHandler(reasons)
    role, design = spec["role"], spec["design"]
    width = spec["width"]
    instance = Instance(
        spec["model"],
        spec["ec"],
        width=width,
        dtype=torch.float16,
        max_num_seqs=256,
        check=False,
    )
    Path(spec["ready"]).write_text("ready")
    while not Path(spec["start"]).exists():
        time.sleep(0.01)
    t0 = float(Path(spec["start"]).read_text())
    arrivals = [Arrival(**a) for a in spec["trace"]]
    pending = list(arrivals)
    added: dict[str, float] = {}  # perf_counter at arrival, as Instance.embedded
    deadline = t0 + spec["deadline"]
    held_peak = 0
    while time.time() < deadline:
        now = time.time()
        while pending and t0 + pending[0].at <= now:
            a = pending.pop(0)
            item = Item(f"{a.request}-{a.kind}", a.tokens, a.kind, f"{a.request}-t")
            params = {"consumer_zmq": spec["consumer_zmq"]} if spec.get("consumer_zmq") else None
            name = a.request if role == "consumer" else f"enc-{a.request}"
            instance.add(name, [item], ec_params=params if role == "producer" else None)
            added[name] = time.perf_counter() - (now - (t0 + a.at))
        busy = instance.busy()
        if busy:
            instance.step()
        if design == "resumekit" and role == "consumer":
            held_peak = max(held_peak, sum(c.consumer.held_bytes() for c in instance.connectors))
        # A server's encode instance lives on: it serves until the language side is done.
        if not pending and not busy and (role == "consumer" or Path(spec["done"]).exists()):
            break
        if not busy:
            time.sleep(0.001)
    wall = time.time() - t0
    result: dict[str, Any] = {
        "finished": [asdict(f) for f in instance.finished],
        "embedded": {r: instance.embedded[r] - added[r] for r in instance.embedded if r in added},
        "wall": wall,
        "reasons": reasons.lines[-50:],
        "held_peak": held_peak,
        "misses": len(instance.misses.encoder_cache_miss),
    }
    Path(spec["result"]).write_text(json.dumps(result))
    if role == "consumer":
        Path(spec["done"]).write_text("done")
    instance.shutdown()


# -- the driver -----------------------------------------------------------------------------


RESUMEKIT_BLOCK = 256  # tokens per block of resumekit's landing pool


def resumekit_pool_tokens(pool_bytes: int, width: int) -> int:
    """The tokens resumekit's pool holds in ``pool_bytes`` (fp16 rows plus 16 aux bytes)."""
    per_token = width * 2 + 16
    return max(RESUMEKIT_BLOCK, pool_bytes // per_token // RESUMEKIT_BLOCK * RESUMEKIT_BLOCK)


def design_configs(
    design: str,
    pool_bytes: int,
    width: int,
    push_wait: float,
    max_resume: int | None,
    round0: int | str | None,
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """The consumer's and producer's ECTransferConfig fields, and the producer's
    consumer_zmq (vLLM's Mooncake connector needs it in each request)."""
    if design == "resumekit":
        consumer_base, producer_base = free_port(), free_port()
        block = RESUMEKIT_BLOCK
        pool_tokens = resumekit_pool_tokens(pool_bytes, width)
        common: dict[str, object] = {
            "ec_connector": "ResumekitECConnector",
            "ec_connector_module_path": "resumekit.integrations.vllm",
        }
        consumer = {
            **common,
            "ec_role": "ec_consumer",
            "ec_connector_extra_config": {
                "listen": f"tcp://127.0.0.1:{consumer_base}",
                "peer": f"tcp://127.0.0.1:{producer_base}",
                "pool_tokens": pool_tokens,
                "block_size": block,
                "timeout": 60.0,
                **({"max_resume_tokens": max_resume} if max_resume else {}),
                **({"default_allocate_tokens": round0} if round0 else {}),
            },
        }
        producer = {
            **common,
            "ec_role": "ec_producer",
            "ec_connector_extra_config": {
                "listen": f"tcp://127.0.0.1:{producer_base}",
                "peer": f"tcp://127.0.0.1:{consumer_base}",
                "timeout": 60.0,
            },
        }
        return consumer, producer, None
    port = free_port()
    extra: dict[str, object] = {
        "mooncake_protocol": "tcp",
        "push_wait_timeout_s": push_wait,
        "control_timeout_s": 10,
    }
    common = {
        "ec_connector": "ECMooncakeConnector",
        "ec_buffer_device": "cpu",
        "ec_buffer_size": pool_bytes,
        "ec_ip": "127.0.0.1",
        "ec_connector_extra_config": extra,
    }
    consumer = {**common, "ec_role": "ec_consumer", "ec_port": port}
    producer = {**common, "ec_role": "ec_producer", "ec_port": port + 100}
    return consumer, producer, f"tcp://127.0.0.1:{port}"


def run_design(
    design: str, arrivals: list[Arrival], args: argparse.Namespace, model: str
) -> dict[str, Any]:
    consumer_ec, producer_ec, zmq = design_configs(
        design, args.pool_mb << 20, args.width, args.push_wait, args.max_resume, args.round0
    )
    with tempfile.TemporaryDirectory() as tmp:
        base = {
            "design": design,
            "model": model,
            "width": args.width,
            "trace": [asdict(a) for a in arrivals],
            "start": f"{tmp}/start",
            "done": f"{tmp}/consumer.done",
            "deadline": args.deadline,
            "consumer_zmq": zmq,
        }
        specs = {
            role: {
                **base,
                "role": role,
                "ec": ec,
                "ready": f"{tmp}/{role}.ready",
                "result": f"{tmp}/{role}.json",
            }
            for role, ec in (("consumer", consumer_ec), ("producer", producer_ec))
        }
        procs = {}
        for role in ("consumer", "producer"):
            procs[role] = subprocess.Popen(
                [sys.executable, __file__, "--serve", json.dumps(specs[role])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            while not Path(specs[role]["ready"]).exists():
                if procs[role].poll() is not None:
                    raise RuntimeError(f"{design} {role} died: {_tail(procs[role])}")
                time.sleep(0.05)
        Path(base["start"]).write_text(str(time.time() + 0.5))
        for proc in procs.values():
            try:
                proc.wait(timeout=args.deadline + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
        results = {}
        for role, spec in specs.items():
            path = Path(spec["result"])
            if not path.exists():
                raise RuntimeError(f"{design} {role} reported nothing: {_tail(procs[role])}")
            results[role] = json.loads(path.read_text())
    return results


def _tail(proc: subprocess.Popen[str]) -> str:
    return (proc.stderr.read() if proc.stderr is not None else "")[-2000:]


def summarize(
    design: str, arrivals: list[Arrival], results: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    consumer = results["consumer"]
    tokens = {a.request: a.tokens for a in arrivals}
    reasons = {f["request_id"]: f["reason"] for f in consumer["finished"]}
    done = sorted(r for r, why in reasons.items() if why in ("LENGTH", "STOP"))
    failed = {r: why for r, why in reasons.items() if why not in ("LENGTH", "STOP")}
    waits = sorted(consumer["embedded"][r] for r in done if r in consumer["embedded"])
    pool = args.pool_mb << 20

    def q(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {
        "design": design,
        "completed": len(done),
        "failed": len(failed) + (len(arrivals) - len(reasons)),
        "failed_reasons": sorted(set(failed.values())),
        "connector_said": sorted(set(consumer["reasons"] + results["producer"]["reasons"]))[:6],
        "p50_ms": None if not waits else 1000 * q(waits, 0.5),
        "p99_ms": None if not waits else 1000 * q(waits, 0.99),
        "landing_mb": pool / 2**20,
        "outputs_mb_peak": consumer["held_peak"] / 2**20,
        "wall_s": consumer["wall"],
        "done_ids": done,
        "tokens": tokens,
        "misses": consumer["misses"],
    }


def compare(kind: str, args: argparse.Namespace, model: str) -> tuple[dict[str, Any], bool]:
    """Both designs on one trace: the table, and whether the targets hold."""
    arrivals = trace(kind, args.requests, args.rate, args.seed)
    total = sum(a.tokens for a in arrivals)
    burst = total * (args.width * 2) / 2**20
    print(
        f"\n{kind}: {len(arrivals)} requests, {total:,} tokens ({burst:,.0f} MiB of "
        f"embeddings), largest {max(a.tokens for a in arrivals):,}"
    )
    rows = {}
    for design in ("resumekit", "vllm-mooncake"):
        results = run_design(design, arrivals, args, model)
        rows[design] = (summarize(design, arrivals, results, args), results)
    common = sorted(
        set(rows["resumekit"][0]["done_ids"]) & set(rows["vllm-mooncake"][0]["done_ids"])
    )
    tokens = {a.request: a.tokens for a in arrivals}
    at = {a.request: a.at for a in arrivals}
    for s, results in rows.values():
        finish = {f["request_id"]: f["seconds"] for f in results["consumer"]["finished"]}
        last = max((finish[r] + at[r] for r in common), default=0.0)
        moved = sum(tokens[r] for r in common) * args.width * 2 / 2**20
        s["throughput_mb_s_common"] = moved / last if last else None
        s["common"] = len(common)
        s["finished_at"] = {r: round(at[r] + t, 4) for r, t in finish.items()}
    print(
        f"{'design':15} {'done':>5} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'landing MiB':>11} {'+outputs MiB':>12} {'MiB/s (common)':>15}"
    )
    for design, (s, _) in rows.items():
        p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
        p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}"
        tput = "-" if s["throughput_mb_s_common"] is None else f"{s['throughput_mb_s_common']:.1f}"
        extra = f"{s['outputs_mb_peak']:.1f}" if design == "resumekit" else "0 (in place)"
        print(
            f"{design:15} {s['completed']:>5} {s['failed']:>6} {p50:>8} {p99:>8} "
            f"{s['landing_mb']:>11.1f} {extra:>12} {tput:>15}"
        )
        if s["failed"]:
            why = s["failed_reasons"]
            print(f"  {design} failed: vLLM's finish reason {why}; the connector said:")
            for line in s["connector_said"][:3]:
                print(f"    {line}")
    r, v = rows["resumekit"][0], rows["vllm-mooncake"][0]
    ratio = None
    if r["throughput_mb_s_common"] and v["throughput_mb_s_common"]:
        ratio = r["throughput_mb_s_common"] / v["throughput_mb_s_common"]
    shown = "-" if ratio is None else f"{ratio:.2f}x"
    print(f"common requests: {len(common)}; resumekit / vLLM throughput over them: {shown}")
    checks = {
        "resumekit completes every request": r["completed"] == len(arrivals) and r["misses"] == 0,
        "throughput over the common requests >= 0.9x vLLM's": ratio is not None and ratio >= 0.9,
    }
    for name, held in checks.items():
        print(f"  [{'ok' if held else 'MISSED'}] {name}")
    report = {d: s for d, (s, _) in rows.items()} | {"ratio": ratio, "checks": checks}
    return report, all(checks.values())


def _round0(text: str) -> int | str:
    """``--round0``: tokens, or ``auto``."""
    return text if text == "auto" else count(1, 2**31 - 1)(text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--trace", choices=["image-heavy", "video-mixed", "both"], default="both")
    parser.add_argument("--requests", type=count(1), default=60)
    parser.add_argument("--rate", type=positive, default=20.0, help="arrivals per second")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--width", type=count(1), default=512, help="embedding width (3584: 7B)")
    parser.add_argument(
        "--pool-mb", type=count(1), default=48, help="landing memory per design, MiB"
    )
    parser.add_argument(
        "--push-wait", type=positive, default=10.0, help="vLLM Mooncake's push_wait_timeout_s"
    )
    parser.add_argument(
        "--max-resume",
        type=count(1, 2**31 - 1),
        default=None,
        help="resumekit's max_resume_tokens (default: the connector's, a quarter of the pool)",
    )
    parser.add_argument(
        "--round0",
        type=_round0,
        default=None,
        help="resumekit's default_allocate_tokens: tokens or 'auto' (default: the connector's)",
    )
    parser.add_argument("--deadline", type=positive, default=300.0, help="seconds a design may run")
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    pool_tokens = resumekit_pool_tokens(args.pool_mb << 20, args.width)
    if (
        isinstance(args.round0, int)
        and -(-args.round0 // RESUMEKIT_BLOCK) * RESUMEKIT_BLOCK > pool_tokens
    ):
        parser.error(
            f"--round0 {args.round0} tokens do not fit resumekit's pool of {pool_tokens} "
            f"(--pool-mb {args.pool_mb} at --width {args.width})"
        )
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    from resumekit.sim.vllm import write_tiny_model

    model = str(write_tiny_model(tempfile.mkdtemp(prefix="tiny-qwen2-vl-"), hidden_size=args.width))
    print(
        "token counts: Qwen2.5-VL (an H x W image: ceil(H/28)*ceil(W/28) tokens; a video at 2 "
        "fps: half that per frame)"
    )
    print(
        f"width {args.width} (fp16), landing memory {args.pool_mb} MiB for each design, "
        f"vLLM Mooncake push_wait_timeout_s {args.push_wait:g}, Mooncake TCP on loopback, "
        f"seed {args.seed}"
    )
    traces = ["image-heavy", "video-mixed"] if args.trace == "both" else [args.trace]
    report: dict[str, Any] = {}
    ok = True
    for kind in traces:
        report[kind], held = compare(kind, args, model)
        ok = ok and held
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
