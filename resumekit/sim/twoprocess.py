"""Sender and receiver in two processes on loopback, over
:func:`~resumekit.transports.torch.TorchDistributedTransport` (gloo) or
:func:`~resumekit.transports.mooncake.MooncakeTransport` (TCP).

The engine of ``resumekit simulate --transport torch|mooncake`` and of the
two-process tests. Both processes are started with ``torch.multiprocessing`` (spawn) and
regenerate each request's source from its seed, so the receiver checks its
output against the very tensors the sender sent. Every loop has a deadline.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from queue import Empty
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resumekit._check import as_int, as_seconds
from resumekit.allocator import BlockAllocator, BlockBuffers, EmbeddingTensors, ReuseOrder
from resumekit.allocator.block_allocator import MAX_BLOCK_SIZE, MAX_NUM_BLOCKS
from resumekit.allocator.buffers import DEFAULT_AUX_SIZE
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.protocol import EmbeddingSender, ResumableReceiver
from resumekit.protocol.receiver import AUTO
from resumekit.sim._failing import (
    _FailingInProcess,
    _FailingMooncakeSender,
    _FailingSenderTransport,
)
from resumekit.sim.simulate import (
    RoundLog,
    RoundRow,
    SimulationReport,
    check_reuse,
    random_source,
)
from resumekit.transports._threaded import MAX_TIMEOUT, ThreadedEnd, check_timeout
from resumekit.transports.inprocess.loopback import default_pool_blocks
from resumekit.transports.mooncake import (
    MooncakeSenderEnd,
    MooncakeTransport,
    load_mooncake,
)
from resumekit.transports.torch import TorchDistributedTransport, TorchSenderEnd

MAX_TOKENS = MAX_BLOCK_SIZE  # token counts travel as int32
IDLE_WAIT = 0.05  # longest a loop with nothing to do blocks in transport.wait()


@dataclass(frozen=True)
class Request:
    rid: int
    tokens: int
    seed: int = 0
    # The source's hidden size and dtype when they are not the pool's (a misconfigured encoder)
    hidden: int | None = None
    dtype: str | None = None


def _source(r: Request, cfg: PairConfig) -> EmbeddingTensors:
    """What the encoder sends for ``r``: the pool's layout unless ``r`` says otherwise."""
    source = random_source(r.tokens, r.hidden or cfg.hidden, seed=r.seed)
    if r.dtype is None:
        return source
    embeddings = source.embeddings.to(getattr(torch, r.dtype))
    return EmbeddingTensors(embeddings, source.fill_ids, source.mrope)


@dataclass
class PairConfig:
    requests: list[Request]
    pool_blocks: int
    block_size: int = 128
    hidden: int = 64
    reuse: ReuseOrder = "lifo"
    default_allocate: int | Literal["auto"] = 8192
    max_round_tokens: int | None = None
    timeout: float = 30.0  # a round with no progress for this long declares the peer lost
    deadline: float = 120.0  # wall-clock bound on each process's loop
    fault_round: int | None = None  # the sender fails inside its n-th round (from 1) ...
    fault: Literal["die", "hang"] = "die"  # ... by killing its process, or by going silent
    # (rid, epoch) pairs: the engine aborts rid as soon as that round is in flight
    aborts: tuple[tuple[int, int], ...] = ()
    # "ordered": payloads on a second gloo group, matched by order as over NCCL
    payload: Literal["shared", "ordered"] = "shared"
    aux_size: int = DEFAULT_AUX_SIZE  # the receiver's aux rows (the sender's end keeps its default)
    # "inprocess": both ends in this process (run_pair calls run_in_process)
    transport: Literal["inprocess", "torch", "mooncake"] = "torch"

    def __post_init__(self) -> None:
        """Refuse what a child process would only fail on later, naming the field."""
        if not isinstance(self.requests, list) or not all(
            isinstance(r, Request) for r in self.requests
        ):
            raise InvalidArgumentError("requests must be a list of Request")
        for r in self.requests:
            as_int(r.rid, "Request.rid", minimum=0)
            as_int(r.tokens, "Request.tokens", minimum=1, maximum=MAX_TOKENS)
            as_int(r.seed, "Request.seed", minimum=0)
        rids = [r.rid for r in self.requests]
        if len(set(rids)) != len(rids):
            raise InvalidArgumentError("requests: each rid at most once")
        as_int(self.pool_blocks, "pool_blocks", minimum=1, maximum=MAX_NUM_BLOCKS)
        as_int(self.block_size, "block_size", minimum=1, maximum=MAX_BLOCK_SIZE)
        as_int(self.hidden, "hidden", minimum=1)
        check_reuse(self.reuse)
        if self.default_allocate != AUTO:
            as_int(self.default_allocate, "default_allocate", minimum=1, maximum=MAX_TOKENS)
        if self.max_round_tokens is not None:
            as_int(self.max_round_tokens, "max_round_tokens", minimum=1)
        check_timeout(self.timeout)
        as_seconds(self.deadline, "deadline", maximum=MAX_TIMEOUT)
        if self.fault_round is not None:
            as_int(self.fault_round, "fault_round", minimum=1)
        for name, value, allowed in (
            ("fault", self.fault, ("die", "hang")),
            ("payload", self.payload, ("shared", "ordered")),
            ("transport", self.transport, ("inprocess", "torch", "mooncake")),
        ):
            if value not in allowed:
                raise InvalidArgumentError(f"{name} must be one of {allowed}, not {value!r}")
        as_int(self.aux_size, "aux_size", minimum=2)


@dataclass
class RequestOutcome:
    rid: int
    tokens: int
    state: str
    reason: str | None
    intact: bool
    rounds: list[RoundRow] = field(default_factory=list)


@dataclass
class PairReport:
    outcomes: list[RequestOutcome]
    leaked_blocks: int
    quarantined: int
    records_left: int
    seconds: float
    steps: int = 0  # the receiver's event-loop iterations until every request finished
    receiver_exit: int | None = None
    sender_exit: int | None = None


def run_pair(cfg: PairConfig) -> PairReport:
    """Run one receiver and one sender process; return what the receiver saw."""
    if cfg.transport == "inprocess":
        return run_in_process(cfg)
    if cfg.transport == "mooncake":
        load_mooncake()  # what to install, before any process starts
    port = _free_port()
    control = (_zmq(_free_port()), _zmq(_free_port()))  # (receiver's, sender's) endpoints
    while control[0] == control[1]:
        control = (control[0], _zmq(_free_port()))
    ctx = mp.get_context("spawn")
    queue: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=_receiver_main, args=(cfg, port, control, queue), name="resumekit-receiver"
        ),
        ctx.Process(target=_sender_main, args=(cfg, port, control), name="resumekit-sender"),
    ]
    for p in procs:
        p.start()
    report = collect(procs, queue, time.monotonic() + cfg.deadline + 60)
    if isinstance(report, _ChildFailure):
        raise TransportError(f"the receiver process failed: {report.kind}: {report.message}")
    assert isinstance(report, PairReport)
    report.receiver_exit, report.sender_exit = procs[0].exitcode, procs[1].exitcode
    return report


def collect(procs: Sequence[Any], queue: Any, limit: float) -> Any:
    """The report ``procs[0]`` puts on ``queue``, read while the processes run: a report
    larger than the pipe's buffer blocks its writer until it is read, so waiting for the
    processes first would hang both. Kills what is still running at ``limit``."""
    report: Any = None
    got = False
    while not got and time.monotonic() < limit:
        try:
            report, got = queue.get(timeout=0.05), True
        except Empty:
            if not procs[0].is_alive():
                try:  # it may have put the report just before it exited
                    report, got = queue.get(timeout=1.0), True
                except Empty:
                    break
    for p in procs:
        p.join(max(0.0, limit - time.monotonic()))
    hung = [p.name for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TransportError(f"two-process run did not finish: {hung} killed")
    if not got:
        raise TransportError(f"the receiver process reported nothing (exit {procs[0].exitcode})")
    return report


def simulate_distributed(
    tokens: int,
    *,
    default_allocate: int | Literal["auto"] = 8192,
    pool_blocks: int | None = None,
    block_size: int = 128,
    hidden: int = 64,
    reuse: ReuseOrder = "lifo",
    max_round_tokens: int | None = None,
    seed: int = 0,
    timeout: float = 30.0,
    transport: Literal["torch", "mooncake"] = "torch",
) -> SimulationReport:
    """``resumekit simulate --transport torch|mooncake``: one transfer, two processes, the
    same report. Arguments are checked (:class:`PairConfig`) before any process starts."""
    tokens = as_int(tokens, "tokens", minimum=1, maximum=MAX_TOKENS)
    block_size = as_int(block_size, "block_size", minimum=1, maximum=MAX_BLOCK_SIZE)
    if default_allocate != AUTO:
        default_allocate = as_int(default_allocate, "default_allocate", minimum=1)
    if pool_blocks is None:
        pool_blocks = default_pool_blocks(tokens, default_allocate, block_size)
    pair = run_pair(
        PairConfig(
            [Request(0, tokens, seed)],
            pool_blocks,
            block_size,
            hidden,
            reuse,
            default_allocate,
            max_round_tokens,
            timeout,
            transport=transport,
        )
    )
    [outcome] = pair.outcomes
    return SimulationReport(
        total_tokens=tokens,
        rounds=outcome.rounds,
        state=outcome.state,
        reason=outcome.reason,
        intact=outcome.intact,
        leaked_blocks=pair.leaked_blocks,
        steps=pair.steps,
    )


# -- the two processes -----------------------------------------------------------------


def _init(rank: int, port: int, cfg: PairConfig) -> dict[str, Any]:
    """Join the group; return the transport's payload options for ``cfg.payload``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Two processes on one machine: each takes its share of the cores, or torch's
    # spinning threads starve gloo's I/O threads (seen here: 1.4x slower).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if cfg.transport == "mooncake":
        return {}
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=cfg.deadline + 30),
    )
    if cfg.payload == "ordered":
        return {"data_group": dist.new_group([0, 1], backend="gloo"), "match": "order"}
    return {}


@dataclass(frozen=True)
class _ChildFailure:
    """What the receiver process raised, sent in place of its report."""

    kind: str
    message: str


def _receiver_main(cfg: PairConfig, port: int, control: tuple[str, str], queue: Any) -> None:
    try:
        _receive(cfg, port, control, queue)
    except Exception as error:
        queue.put(_ChildFailure(type(error).__name__, str(error)))
        raise


def _receive(cfg: PairConfig, port: int, control: tuple[str, str], queue: Any) -> None:
    start = time.monotonic()
    payload = _init(0, port, cfg)
    allocator = BlockAllocator(cfg.pool_blocks, cfg.block_size, reuse=cfg.reuse)
    buffers = BlockBuffers(allocator, cfg.hidden, device="cpu", aux_size=cfg.aux_size)
    transport: ThreadedEnd
    if cfg.transport == "mooncake":
        transport = MooncakeTransport(
            "receiver", listen=control[0], peer=control[1], buffers=buffers, timeout=cfg.timeout
        )
    else:
        transport = TorchDistributedTransport(
            "receiver", 1, buffers=buffers, timeout=cfg.timeout, owns_group=True, **payload
        )
    rounds = RoundLog()
    receiver = ResumableReceiver(
        buffers,
        transport,
        cfg.default_allocate,
        max_resume_tokens=cfg.max_round_tokens,
        observer=rounds,
    )

    def idle(finished: Sequence[Hashable]) -> None:
        if not finished:
            transport.wait(IDLE_WAIT)

    queue.put(_drive(cfg, receiver, rounds, start, idle, lambda: transport.closed))
    transport.shutdown()  # owns the group: destroys it


def _drive(
    cfg: PairConfig,
    receiver: ResumableReceiver,
    rounds: RoundLog,
    start: float,
    idle: Callable[[Sequence[Hashable]], None],
    closed: Callable[[], bool],
) -> PairReport:
    """The engine's loop on the receiver side until every request ends; what it saw."""
    allocator = receiver.allocator
    for r in cfg.requests:
        receiver.add(r.rid)
    deadline = start + cfg.deadline
    live = {r.rid for r in cfg.requests}
    steps = 0
    while live and time.monotonic() < deadline:
        finished = receiver.step()
        steps += 1
        live.difference_update(finished)
        for rid, epoch in cfg.aborts:
            if rid in live:
                rec = receiver.record(rid)
                if rec.epoch == epoch and rec.allocation is not None:
                    receiver.abort(rid)
        idle(finished)
    outcomes = []
    for r in cfg.requests:
        state, intact = "Transferring", False
        reason: str | None = "deadline passed"
        if r.rid in receiver and receiver.poll(r.rid).terminal:
            result = receiver.take(r.rid)
            state, reason = result.state.name, result.reason
            if result.output is not None:
                intact = result.output.equal(random_source(r.tokens, cfg.hidden, seed=r.seed))
        outcomes.append(
            RequestOutcome(r.rid, r.tokens, state, reason, intact, rounds.rows.get(r.rid, []))
        )
    # Late answers (to cancels) release the quarantine; give them a moment.
    settle = time.monotonic() + min(cfg.timeout, 5.0)
    while receiver.quarantined() and time.monotonic() < settle and not closed():
        receiver.step()
        idle([])
    return PairReport(
        outcomes,
        leaked_blocks=allocator.num_blocks - allocator.num_free_blocks,
        quarantined=len(receiver.quarantined()),
        records_left=len(receiver),
        seconds=time.monotonic() - start,
        steps=steps,
    )


def run_in_process(cfg: PairConfig) -> PairReport:
    """The same scenario with both ends in this process over
    :class:`~resumekit.transports.inprocess.InProcessTransport`: the sender steps whenever
    the receiver does; a killed sender is ``crash_sender``."""
    if cfg.fault_round is not None and cfg.fault != "die":
        raise InvalidArgumentError(
            "fault: the in-process transport has no clock, so a silent sender is never "
            "declared lost there; only 'die' applies"
        )
    start = time.monotonic()
    allocator = BlockAllocator(cfg.pool_blocks, cfg.block_size, reuse=cfg.reuse)
    buffers = BlockBuffers(allocator, cfg.hidden, device="cpu", aux_size=cfg.aux_size)
    transport = _FailingInProcess(buffers, cfg.fault_round)
    rounds = RoundLog()
    receiver = ResumableReceiver(
        buffers,
        transport,
        cfg.default_allocate,
        max_resume_tokens=cfg.max_round_tokens,
        observer=rounds,
    )
    sender = EmbeddingSender(transport)
    for r in cfg.requests:
        sender.add(r.rid, _source(r, cfg))

    def idle(finished: Sequence[Hashable]) -> None:
        sender.step()

    report = _drive(cfg, receiver, rounds, start, idle, lambda: not transport.sender_alive)
    report.receiver_exit = 0
    report.sender_exit = -9 if not transport.sender_alive else 0
    return report


def _sender_main(cfg: PairConfig, port: int, control: tuple[str, str]) -> None:
    start = time.monotonic()
    payload = _init(1, port, cfg)
    transport: TorchSenderEnd | MooncakeSenderEnd
    if cfg.transport == "mooncake":
        ends: dict[str, Any] = {"listen": control[1], "peer": control[0], "timeout": cfg.timeout}
        if cfg.fault_round is not None:
            transport = _FailingMooncakeSender(fault_round=cfg.fault_round, fault=cfg.fault, **ends)
        else:
            transport = MooncakeTransport("sender", **ends)
    elif cfg.fault_round is not None:
        transport = _FailingSenderTransport(
            0, fault_round=cfg.fault_round, fault=cfg.fault, owns_group=True, **payload
        )
    else:
        transport = TorchDistributedTransport("sender", 0, owns_group=True, **payload)
    sender = EmbeddingSender(transport)
    for r in cfg.requests:
        sender.add(r.rid, _source(r, cfg))
    deadline = start + cfg.deadline
    while not transport.finished and time.monotonic() < deadline:
        if not sender.step():
            transport.wait(IDLE_WAIT)
    transport.shutdown()  # owns the group: destroys it


def _zmq(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


__all__ = [
    "PairConfig",
    "PairReport",
    "Request",
    "RequestOutcome",
    "run_in_process",
    "run_pair",
    "simulate_distributed",
]
