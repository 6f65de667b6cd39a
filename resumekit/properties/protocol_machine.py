"""The protocol under an adversary, as a Hypothesis state machine over the real implementation.

Receiver, sender, allocator and in-process transport run for real; the
adversary duplicates, delays, reorders and replays statuses, aborts requests,
crashes the sender and squeezes the pool. Invariants 1, 3, 4 and 5 are checked
as events happen (through a :class:`~resumekit.properties.invariants.Ledger`),
2 and 6 at teardown, after fair delivery.
"""

from __future__ import annotations

import random
import sys
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import hypothesis.strategies as st
import torch
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from resumekit.allocator import Allocation, BlockAllocator, EmbeddingTensors, ReuseOrder
from resumekit.properties.invariants import (
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    PROGRESS,
    Ledger,
    nothing_left,
    output_intact,
    record_collected,
    require,
    stale_changes_nothing,
    succeeds_without_faults,
    terminates,
)
from resumekit.properties.strategies import strategy
from resumekit.simulate import Loopback
from resumekit.statemachine import InProcessTransport, Landed, RoundPost, Status, TransferState

if TYPE_CHECKING:
    from resumekit.statemachine import RequestRecord

MAX_REQUESTS = 4
MAX_TOTAL = 200_000
HIDDEN = 2


class CheckedAllocator(BlockAllocator):
    """Tells the ledger about every free before it happens."""

    ledger: Ledger | None = None

    def free(self, allocation: Allocation) -> None:
        if self.ledger is not None:
            self.ledger.before_free(allocation)
        super().free(allocation)


class CheckedTransport(InProcessTransport):
    """Tells the ledger about every write before it happens; remembers delivered statuses."""

    ledger: Ledger | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered_landed: list[Landed] = []

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        if self.sender_alive and self.ledger is not None:
            self.ledger.before_write(post)
        super().write_round(post, data, aux)

    def poll_statuses(self) -> Sequence[Status]:
        batch = super().poll_statuses()
        for status in batch:
            if isinstance(status, Landed):
                self.delivered_landed.append(status)
        del self.delivered_landed[:-16]
        return batch


@dataclass(frozen=True)
class ProtocolConfig:
    block_size: int
    pool_blocks: int
    default_tokens: int
    max_resume_tokens: int | None
    reuse: ReuseOrder


@st.composite
def protocol_configs(draw: st.DrawFn) -> ProtocolConfig:
    """Pools and allocations drawn small (rounds reuse blocks) and large."""
    block_size = draw(st.sampled_from([1, 4, 16, 128]), label="block_size")
    default_blocks = draw(st.sampled_from([1, 2, 4, 64]), label="default blocks")
    pool_blocks = draw(
        st.one_of(
            st.integers(default_blocks, 3 * default_blocks + 2),
            st.just(max(default_blocks, 4096 // block_size)),
        ),
        label="pool blocks",
    )
    cap = draw(st.sampled_from([None, 1, 2, 4]), label="resume cap (x default)")
    return ProtocolConfig(
        block_size=block_size,
        pool_blocks=pool_blocks,
        default_tokens=default_blocks * block_size,
        max_resume_tokens=None if cap is None else cap * default_blocks * block_size,
        reuse=draw(st.sampled_from(["lifo", "fifo"]), label="reuse"),
    )


def labelled_source(tokens: int, label: int) -> EmbeddingTensors:
    """A source whose every token is distinct (fill ids count from ``label << 20``),
    so a token in the wrong place or of the wrong request fails the comparison;
    built with ``arange``, a fraction of the cost of random tensors."""
    fill = torch.arange(tokens, dtype=torch.int32) + (label << 20)
    emb = (fill % 509).to(torch.bfloat16).unsqueeze(1).repeat(1, HIDDEN)
    mrope = torch.stack([fill, fill + 1, fill + 2])
    return EmbeddingTensors(emb, fill, mrope)


def _snapshot(rec: RequestRecord) -> tuple[object, ...]:
    """What a stale status must not change: state, epoch, sent, total, the allocation."""
    allocation = rec.allocation
    generation = None if allocation is None else allocation.generation
    return (rec.state.name, rec.epoch, rec.sent, rec.total, generation)


class ProtocolMachineBase(RuleBasedStateMachine):
    """Rules of the adversary; :func:`protocol_machine` binds the round-filter strategy."""

    strategy_name: ClassVar[str] = "epoch"
    steps_run: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.cfg: ProtocolConfig | None = None
        self.faulted: set[Hashable] = set()
        self.crashed = False
        self.pending_sources: dict[Hashable, EmbeddingTensors] = {}
        self.taken: list[tuple[Hashable, weakref.ref[RequestRecord]]] = []
        self.pressure: list[Allocation] = []
        self.next_rid = 0

    @property
    def p(self) -> Loopback:
        return self._pair

    @property
    def t(self) -> CheckedTransport:
        transport = self._pair.transport
        assert isinstance(transport, CheckedTransport)
        return transport

    def _count(self) -> None:
        type(self).steps_run += 1

    # -- setup -------------------------------------------------------------------

    @initialize(cfg=protocol_configs())
    def setup(self, cfg: ProtocolConfig) -> None:
        self.cfg = cfg
        self._pair = Loopback(
            pool_blocks=cfg.pool_blocks,
            block_size=cfg.block_size,
            hidden=HIDDEN,
            reuse=cfg.reuse,
            default_allocate=cfg.default_tokens,
            max_resume_tokens=cfg.max_resume_tokens,
            observer=self.ledger,  # type: ignore[arg-type]
            round_filter=strategy(self.strategy_name),
            allocator_type=CheckedAllocator,
            transport_type=CheckedTransport,
        )
        self.ledger.allocator = self.p.allocator
        self.p.allocator.ledger = self.ledger  # type: ignore[attr-defined]
        self.p.transport.ledger = self.ledger  # type: ignore[attr-defined]

    # -- traffic -----------------------------------------------------------------

    @precondition(lambda self: self.next_rid < MAX_REQUESTS)
    @rule(data=st.data(), late_source=st.sampled_from([False, False, True]))
    def add_request(self, data: st.DataObject, late_source: bool) -> None:
        self._count()
        assert self.cfg is not None
        rounds_worth = 6 * max(self.cfg.default_tokens, self.cfg.max_resume_tokens or 0)
        total = data.draw(
            st.one_of(st.integers(1, min(MAX_TOTAL, rounds_worth)), st.integers(1, MAX_TOTAL)),
            label="total tokens",
        )
        total = min(total, rounds_worth * 4)  # bounded rounds keep examples fast
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        source = labelled_source(total, self.next_rid)
        self.p.sources[rid] = source
        self.p.receiver.add(rid)
        if late_source:
            self.pending_sources[rid] = source
        else:
            self.p.sender.add(rid, source)

    @precondition(lambda self: bool(self.pending_sources))
    @rule()
    def source_ready(self) -> None:
        self._count()
        rid, source = next(iter(self.pending_sources.items()))
        del self.pending_sources[rid]
        if self.p.transport.sender_alive:
            self.p.sender.add(rid, source)

    @rule(take=st.booleans())
    def receiver_step(self, take: bool) -> None:
        """One event-loop iteration; the engine may then take what finished."""
        self._count()
        finished = self.p.receiver.step()
        if take:
            for rid in finished:
                if rid in self.p.receiver:
                    self._take(rid)

    @rule()
    def sender_step(self) -> None:
        self._count()
        self.p.sender.step()

    @rule()
    def both_step(self) -> None:
        """A receiver step then a sender step: the common, fault-free interleaving."""
        self._count()
        self.p.step()

    # -- benign faults: nothing may fail because of these ---------------------------

    @precondition(lambda self: bool(self.p.transport.in_flight))
    @rule(data=st.data())
    def duplicate_status(self, data: st.DataObject) -> None:
        self._count()
        t = self.p.transport
        t.duplicate(data.draw(st.integers(0, len(t.in_flight) - 1), label="status"))

    @precondition(lambda self: len(self.p.transport.in_flight) > 1)
    @rule(seed=st.integers(0, 2**16))
    def reorder_statuses(self, seed: int) -> None:
        self._count()
        self.p.transport.shuffle(random.Random(seed))

    @rule(hold=st.sampled_from([False, False, True]))
    def delay_statuses(self, hold: bool) -> None:
        self._count()
        if hold:
            self.p.transport.hold()
        else:
            self.p.transport.release()

    @precondition(lambda self: bool(self.t.delivered_landed))
    @rule(data=st.data())
    def replay_old_status(self, data: st.DataObject) -> None:
        """A late duplicate of a status already delivered must change nothing."""
        self._count()
        t = self.t
        receiver = self.p.receiver
        # Aim where it matters: old statuses of requests still mid-transfer.
        mid_transfer = [
            s
            for s in t.delivered_landed
            if s.rid in receiver and receiver.record(s.rid).allocation is not None
        ]
        old = data.draw(st.sampled_from(mid_transfer or t.delivered_landed), label="old status")
        if old.rid not in receiver:
            return
        rec = receiver.record(old.rid)
        if rec.state is TransferState.Transferring and rec.allocation is None:
            return  # waiting for blocks: this step may legitimately serve it
        before = _snapshot(rec)
        saved, t.in_flight = t.in_flight, [old]
        held, t.held = t.held, False
        try:
            receiver.step()
        finally:
            t.in_flight, t.held = saved + t.in_flight, held
        require(PROGRESS, stale_changes_nothing(old.rid, before, _snapshot(rec)))

    @rule(grab=st.integers(-1, 4))
    def pool_pressure(self, grab: int) -> None:
        """Another user of the pool takes free blocks (``grab`` > 0) or returns some."""
        self._count()
        a = self.p.allocator
        if grab <= 0:
            if self.pressure:
                a.free(self.pressure.pop())
            return
        n = min(grab, a.num_free_blocks)
        if n:
            got = a.allocate(n * a.block_size, "pressure")
            assert got is not None
            self.pressure.append(got)

    # -- destructive faults: the requests they touch may fail, nothing may leak ------

    @precondition(lambda self: self.next_rid > 0)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self._count()
        rid = f"r{data.draw(st.integers(0, self.next_rid - 1), label='request')}"
        if rid in self.p.receiver:
            self.faulted.add(rid)
            self.p.receiver.abort(rid)

    @precondition(lambda self: not self.crashed)
    @rule(mid_round=st.booleans(), now=st.sampled_from([False, False, False, True]))
    def crash_sender(self, mid_round: bool, now: bool) -> None:
        """Kill the sender (drawn rarely: everything after it is failure handling)."""
        self._count()
        if not now:
            return
        self.crashed = True
        if mid_round:
            self.p.transport.crash_after_next_write = True
        else:
            self.p.transport.crash_sender()

    # -- the engine takes what finished --------------------------------------------

    def _take(self, rid: Hashable) -> None:
        receiver = self.p.receiver
        self.taken.append((rid, weakref.ref(receiver.record(rid))))
        result = receiver.take(rid)
        if not self._touched(rid):
            require(LIVENESS, succeeds_without_faults(rid, result.state.name, result.reason))
        if result.output is not None:
            require(INTEGRITY, output_intact(rid, result.output.equal(self.p.sources[rid])))
        del self.p.sources[rid]

    def _touched(self, rid: Hashable) -> bool:
        return rid in self.faulted or self.crashed

    @invariant()
    def allocator_consistent(self) -> None:
        """Blocks are conserved (cheap, every step); the full O(pool) check runs at teardown."""
        if self.cfg is not None:
            a = self.p.allocator
            held = sum(len(x.blocks) for x in a.outstanding())
            assert a.num_free_blocks + held == a.num_blocks, (
                f"{a.num_free_blocks} free + {held} held != {a.num_blocks} blocks"
            )

    # -- teardown: fair delivery, then liveness and leaks -----------------------------

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None or self.cfg is None:
            return  # a step already failed: keep its report
        p = self.p
        p.allocator.check_invariants()
        p.transport.release()
        while self.pressure:
            p.allocator.free(self.pressure.pop())
        for rid, source in list(self.pending_sources.items()):
            if p.transport.sender_alive:
                p.sender.add(rid, source)
        self.pending_sources.clear()
        bound = sum(p.step_bound(s.num_tokens) for s in p.sources.values()) + 16
        p.run(bound)
        require(LIVENESS, terminates(p.live(), bound))
        for rid in list(p.sources):
            self._take(rid)
        for _ in range(4):  # late statuses release the quarantine
            p.step()
        sender_left = 0 if self.crashed else len(p.sender) + len(p.sender._parked)
        require(
            NO_LEAK,
            nothing_left(
                len(p.allocator.outstanding()),
                len(p.receiver.quarantined()),
                len(p.receiver),
                sender_left,
            ),
        )
        for rid, ref in self.taken:
            require(NO_LEAK, record_collected(rid, ref() is not None))


def protocol_machine(strategy_name: str = "epoch") -> type[ProtocolMachineBase]:
    """The protocol machine with the receiver deciding rounds by ``strategy_name``."""
    strategy(strategy_name)  # validates the name
    name = f"ProtocolMachine_{strategy_name.replace('-', '_')}"
    return type(name, (ProtocolMachineBase,), {"strategy_name": strategy_name})


__all__ = [
    "CheckedAllocator",
    "CheckedTransport",
    "ProtocolConfig",
    "ProtocolMachineBase",
    "protocol_configs",
    "protocol_machine",
]
