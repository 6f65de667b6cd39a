"""One transfer, receiver and sender in one process: the engine of ``resumekit simulate``."""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from resumekit._check import as_int
from resumekit.allocator import EmbeddingTensors, ReuseOrder
from resumekit.errors import InvalidArgumentError
from resumekit.protocol import ReceiverObserver
from resumekit.protocol.receiver import AUTO
from resumekit.transports.inprocess.loopback import Loopback, default_pool_blocks

if TYPE_CHECKING:
    from resumekit.allocator import Allocation


@dataclass(frozen=True)
class RoundRow:
    epoch: int
    tokens: int
    sent: int  # tokens received after this round
    blocks: list[int]
    generation: int


@dataclass
class SimulationReport:
    total_tokens: int
    rounds: list[RoundRow] = field(default_factory=list)
    state: str = "Transferring"
    reason: str | None = None
    intact: bool = False
    leaked_blocks: int = 0
    steps: int = 0

    @property
    def resumes(self) -> int:
        return max(0, len(self.rounds) - 1)

    def to_json(self) -> str:
        data = asdict(self)
        data["resumes"] = self.resumes
        return json.dumps(data)


def random_source(
    num_tokens: int, hidden: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> EmbeddingTensors:
    """A reproducible embedding: :meth:`EmbeddingTensors.random`."""
    hidden = as_int(hidden, "hidden", minimum=1)
    return EmbeddingTensors.random(num_tokens, hidden, seed=seed, device=device)


class RoundLog(ReceiverObserver):
    """Records every consumed round of every request as a :class:`RoundRow`."""

    def __init__(self) -> None:
        self.rows: dict[Hashable, list[RoundRow]] = {}
        self._sent: dict[Hashable, int] = {}

    def round_consumed(
        self, rid: Hashable, epoch: int, tokens: int, allocation: Allocation
    ) -> None:
        sent = self._sent[rid] = self._sent.get(rid, 0) + tokens
        self.rows.setdefault(rid, []).append(
            RoundRow(epoch, tokens, sent, list(allocation.blocks), allocation.generation)
        )


def simulate(
    tokens: int,
    *,
    default_allocate: int | Literal["auto"] = 8192,
    pool_blocks: int | None = None,
    block_size: int = 128,
    hidden: int = 64,
    reuse: ReuseOrder = "lifo",
    max_round_tokens: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> SimulationReport:
    """Move a random ``tokens``-long embedding through the protocol and report every round.

    ``default_allocate`` is round 0's tokens, or ``"auto"`` (the receiver sizes it);
    ``pool_blocks`` defaults to a pool that holds the whole embedding (and the
    default allocation); ``max_round_tokens`` caps each resume's allocation; the
    buffers live on ``device`` (CUDA when present, else CPU).
    """
    tokens = as_int(tokens, "tokens", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1)
    if default_allocate != AUTO:
        default_allocate = as_int(default_allocate, "default_allocate", minimum=1)
    if pool_blocks is None:
        pool_blocks = default_pool_blocks(tokens, default_allocate, block_size)
    report = SimulationReport(total_tokens=tokens)
    log = RoundLog()
    pair = Loopback(
        pool_blocks=pool_blocks,
        block_size=block_size,
        hidden=hidden,
        reuse=reuse,
        default_allocate=default_allocate,
        max_resume_tokens=max_round_tokens,
        observer=log,
        device=device,
    )
    rid = "request-0"
    pair.add(rid, tokens, seed=seed)
    bound = pair.step_bound(tokens)
    report.steps = pair.run(bound)
    report.rounds = log.rows.get(rid, [])
    state = pair.receiver.poll(rid)
    report.state = state.name
    if state.terminal:
        result = pair.receiver.take(rid)
        report.reason = result.reason
        report.intact = result.output is not None and result.output.equal(pair.sources[rid])
    else:
        report.reason = f"no progress after {bound} steps"
    report.leaked_blocks = pair.allocator.num_blocks - pair.allocator.num_free_blocks
    return report


def format_blocks(blocks: list[int]) -> str:
    """``[3, 4, 5, 9]`` as ``3-5,9``."""
    parts: list[str] = []
    start = prev = None
    for b in blocks:
        if prev is not None and b == prev + 1:
            prev = b
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = b
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def format_report(report: SimulationReport) -> str:
    lines = [f"{'epoch':>5}  {'tokens':>7}  {'sent':>7}  {'generation':>10}  blocks"]
    for r in report.rounds:
        lines.append(
            f"{r.epoch:>5}  {r.tokens:>7}  {r.sent:>7}  {r.generation:>10}  "
            f"{format_blocks(r.blocks)}"
        )
    verdict = "intact" if report.intact else "NOT intact"
    lines.append(
        f"verdict: {report.state}, {report.total_tokens} tokens in {len(report.rounds)} "
        f"round(s) ({report.resumes} resume(s)), output {verdict}, "
        f"{report.leaked_blocks} block(s) leaked"
        + (f"; reason: {report.reason}" if report.reason else "")
    )
    return "\n".join(lines)


def check_reuse(value: str) -> ReuseOrder:
    if value == "lifo":
        return "lifo"
    if value == "fifo":
        return "fifo"
    raise InvalidArgumentError(f"reuse must be lifo or fifo, not {value!r}")


__all__ = [
    "Loopback",
    "RoundLog",
    "RoundRow",
    "SimulationReport",
    "default_pool_blocks",
    "format_report",
    "random_source",
    "simulate",
]
