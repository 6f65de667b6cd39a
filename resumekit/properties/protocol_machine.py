"""The protocol under an adversary, as a Hypothesis state machine over the real implementation.

Receiver, sender, allocator, torch block buffers and the in-process transport
run for real. The adversary duplicates, delays, reorders and replays statuses,
forges refusals and landings for rounds never posted (or of an id's earlier
life), slips malformed items (each field of an unusable type) into batches of
statuses and posts, hands the sender bad sources, aborts
requests and adds their ids again while their old statuses are in flight,
crashes or restarts the sender, and squeezes the pool at any step or right
after a free. Invariants 1, 3, 4 and 5 are checked as events happen (through a
:class:`~resumekit.properties.invariants.Ledger`), 7 (served in order) around
every receiver step, 2 and 6 at teardown, after
fair delivery, with the pool's other user keeping what it may keep for good.

Every rule writes one line to the machine's ``log``: the steps of a falsifying
example are read from there, not from Hypothesis's printed notes. What the rules
draw (configurations, sources) is in :mod:`resumekit.properties.draws`.

One file: one Hypothesis state machine, whose rules are its methods; split, the
adversary's rules would no longer be read beside the teardown that judges them.
"""

from __future__ import annotations

import random
import sys
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import hypothesis.strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from resumekit.allocator import Allocation, BlockAllocator, EmbeddingTensors
from resumekit.errors import InvalidArgumentError
from resumekit.properties.bounds import (
    AHEAD,
    ASKEW,
    FORGED,
    MISCOUNTED,
    OLD,
    POISON_VALUES,
    POISONED_POST,
    POISONED_STATUS,
    PREMATURE,
    STALE,
    TRUNCATED,
)
from resumekit.properties.draws import (
    HIDDEN,
    ProtocolConfig,
    bad_sources,
    labelled_source,
    protocol_configs,
)
from resumekit.properties.invariants import (
    ACCOUNTED,
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    PROGRESS,
    InvariantViolation,
    Ledger,
    aborted_reported,
    cancel_names_quarantined,
    nothing_left,
    output_intact,
    owed_round,
    record_collected,
    reports_a_round,
    require,
    rounds_counted,
    stale_changes_nothing,
    step_counted,
    step_served_in_order,
    succeeds_without_faults,
    terminates,
    tombstone_dropped,
)
from resumekit.properties.strategies import stamp_progress, strategy
from resumekit.protocol import (
    EmbeddingSender,
    Landed,
    RoundPost,
    Status,
    TransferState,
)
from resumekit.protocol import messages as msg
from resumekit.protocol.sizing import AutoSizer
from resumekit.transports.inprocess import InProcessTransport, Loopback

if TYPE_CHECKING:
    from resumekit.protocol import RequestRecord, ResumableReceiver

MAX_REQUESTS = 4
MAX_TOTAL = 200_000
PRESSURE = "pressure"
FAR = 1_000_000  # an epoch no request reaches


class CheckedAllocator(BlockAllocator):
    """Tells the ledger about every free before it happens; plays the pool's other user.

    With ``grab_armed`` that user takes every free block right after the next
    free, before whoever freed can allocate again: a resume finds the pool empty
    and has to wait.
    """

    ledger: Ledger | None = None
    grab_armed = False
    grabbed: list[Allocation]
    free_before: dict[int, int]  # per generation, free blocks just before (resumes_sized)

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        free = self.num_free_blocks
        allocation = super().allocate(num_tokens, owner)
        if allocation is not None:
            self.free_before[allocation.generation] = free
        return allocation

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int = 1
    ) -> Allocation | None:
        free = self.num_free_blocks
        allocation = super().allocate_up_to(num_tokens, owner, min_tokens)
        if allocation is not None:
            self.free_before[allocation.generation] = free
        return allocation

    def free(self, allocation: Allocation) -> None:
        if self.ledger is not None:
            self.ledger.before_free(allocation)
        super().free(allocation)
        if self.grab_armed and allocation.owner != PRESSURE:
            self.grab_armed = False
            if self.num_free_blocks:
                got = self.allocate(self.num_free_blocks * self.block_size, PRESSURE)
                assert got is not None
                self.grabbed.append(got)


class CheckedTransport(InProcessTransport):
    """Tells the ledger about every write and cancel before it happens; remembers
    delivered statuses."""

    ledger: Ledger | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered_landed: list[Landed] = []
        self.told_lost = False  # the receiver was told the sender is gone, and not yet back
        self.receiver: ResumableReceiver | None = None  # set once built: its quarantine
        self.polled: Sequence[object] = ()  # what the last poll returned, for invariant 8
        self.polled_posts: Sequence[object] = ()

    def poll_posts(self) -> Sequence[msg.Post]:
        batch = self.polled_posts = super().poll_posts()
        return batch

    def report(self, status: Landed | msg.Cancelled | msg.SenderError) -> None:
        require(ACCOUNTED, reports_a_round(status))
        super().report(status)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        if self.ledger is not None:
            self.ledger.cancelled(rid, incarnation)
        if self.receiver is not None:  # the receiver quarantines before it cancels
            quarantined = self.receiver.quarantined()
            require(NO_LEAK, cancel_names_quarantined(rid, incarnation, epoch, quarantined))
        super().cancel(rid, epoch, incarnation=incarnation)

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        if self.sender_alive and self.ledger is not None:
            self.ledger.before_write(post)
        # The rounds carry the sent-tokens design's marker, whatever the design.
        super().write_round(post, data, stamp_progress(post, data.num_tokens, aux))

    def poll_statuses(self) -> Sequence[Status]:
        batch = self.polled = super().poll_statuses()
        for status in batch:
            if type(status) is Landed and msg.malformed_status(status) is None:
                self.delivered_landed.append(status)
            elif type(status) is msg.PeerLost:
                self.told_lost = True
            elif type(status) is msg.PeerBack:
                self.told_lost = False
        del self.delivered_landed[:-16]
        return batch


def _held(sender: EmbeddingSender) -> tuple[object, ...]:
    """What a refused source must not change: the sources held, by id, and rounds served."""
    snap = sender.snapshot()
    return (len(sender), sorted(repr(rid) for rid, _ in snap.lives), snap.rounds_served)


def _snapshot(rec: RequestRecord) -> tuple[object, ...]:
    """What a stale status must not change: state, epoch, sent, total, the allocation."""
    allocation = rec.allocation
    generation = None if allocation is None else allocation.generation
    return (rec.state.name, rec.epoch, rec.sent, rec.total, generation)


@dataclass
class _Life:
    """One life of a request id: its source and what the engine expects of it."""

    source: EmbeddingTensors
    mrope_delta: int
    hurt: bool = False  # a fault aimed at it: it may fail, with a reason
    incarnation: int | None = None  # what the receiver's add returned


class ProtocolMachineBase(RuleBasedStateMachine):
    """Rules of the adversary; :func:`protocol_machine` binds the round-filter strategy."""

    strategy_name: ClassVar[str] = "epoch"
    steps_run: ClassVar[int] = 0
    machines: ClassVar[int] = 0
    resume_waits: ClassVar[int] = 0  # receiver steps that left a resume waiting for blocks
    last: ClassVar[ProtocolMachineBase | None] = None  # the newest machine: its log is the trace

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        cls.machines += 1
        cls.last = self
        self.log: list[str] = []
        self.ledger = Ledger()
        self.cfg: ProtocolConfig | None = None
        self.crashed = False  # the sender died for good: every request may fail
        self.restart_pending = False  # restarted: a new sender comes once the loss is seen
        self.lives: dict[Hashable, _Life] = {}
        self.earlier: dict[Hashable, int] = {}  # the incarnation of an id's earlier life
        self.pending_sources: dict[Hashable, _Life] = {}
        self.taken: list[tuple[Hashable, weakref.ref[RequestRecord]]] = []
        self.taken_ids: list[Hashable] = []
        self.pressure: list[Allocation] = []
        self.next_rid = 0
        self.next_label = 0

    @property
    def p(self) -> Loopback:
        return self._pair

    @property
    def t(self) -> CheckedTransport:
        transport = self._pair.transport
        assert isinstance(transport, CheckedTransport)
        return transport

    @property
    def allocator(self) -> CheckedAllocator:
        allocator = self._pair.allocator
        assert isinstance(allocator, CheckedAllocator)
        return allocator

    def _note(self, step: str) -> None:
        type(self).steps_run += 1
        self.log.append(step)

    # -- setup -------------------------------------------------------------------

    @initialize(cfg=protocol_configs())
    def setup(self, cfg: ProtocolConfig) -> None:
        self._note(f"setup({cfg})")
        self.cfg = cfg
        self._pair = Loopback(
            pool_blocks=cfg.pool_blocks,
            block_size=cfg.block_size,
            hidden=HIDDEN,
            reuse=cfg.reuse,
            default_allocate="auto" if cfg.auto else cfg.default_tokens,
            max_resume_tokens=cfg.max_resume_tokens,
            observer=self.ledger,  # type: ignore[arg-type]
            receiver_type=strategy(self.strategy_name).receiver,
            allocator_type=CheckedAllocator,
            transport_type=CheckedTransport,
            policy=cfg.policy,
        )
        _poison_outputs(self.p.buffers)
        receiver = self.p.receiver
        self.t.receiver = receiver
        if receiver.sizer is not None:
            # Learn from every size at once, so the examples meet chosen sizes too.
            receiver.sizer = AutoSizer(
                self.p.allocator.block_size,
                receiver.sizer.max_tokens,
                fallback=cfg.default_tokens,
                resume_tokens=cfg.max_resume_tokens,
                min_samples=1,
                refresh=1,
            )
        self.ledger.allocator = self.p.allocator
        self.allocator.ledger = self.ledger
        self.allocator.grabbed = self.pressure
        self.allocator.free_before = {}
        self.t.ledger = self.ledger

    # -- traffic -----------------------------------------------------------------

    def _draw_total(self, data: st.DataObject) -> int:
        assert self.cfg is not None
        rounds_worth = 6 * max(self.cfg.default_tokens, self.cfg.max_resume_tokens or 0)
        total = data.draw(
            st.one_of(st.integers(1, min(MAX_TOTAL, rounds_worth)), st.integers(1, MAX_TOTAL)),
            label="total tokens",
        )
        return min(total, rounds_worth * 4)  # bounded rounds keep examples fast

    def _start(self, rid: Hashable, total: int, mrope_delta: int, late_source: bool) -> None:
        """The engine starts a life of ``rid`` on both sides (the source maybe later)."""
        self.next_label += 1
        life = _Life(labelled_source(total, self.next_label), mrope_delta)
        # Added while the sender is (known to be) gone: it may fail at once, and the
        # encoder's source for it is lost with the link.
        link_down = self.restart_pending or self.t.told_lost  # what it was told, not kept
        life.hurt = self.crashed or link_down
        old = self.lives.get(rid)
        if old is not None and old.incarnation is not None:
            self.earlier[rid] = old.incarnation
        self.lives[rid] = life
        self.p.sources[rid] = life.source
        life.incarnation = self.p.receiver.add(rid)
        if link_down:
            return
        if late_source:
            self.pending_sources[rid] = life  # an earlier life's pending source is abandoned
        else:
            self._late_add(rid, life)

    @precondition(lambda self: self.next_rid < MAX_REQUESTS)
    @rule(
        data=st.data(),
        late_source=st.sampled_from([False, False, True]),
        mrope_delta=st.sampled_from([0, 0, 7, -3, 2**31 - 1, -(2**31)]),
    )
    def add_request(self, data: st.DataObject, late_source: bool, mrope_delta: int) -> None:
        total = self._draw_total(data)
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        self._note(
            f"add_request({rid}, {total} tokens, mrope_delta={mrope_delta}, late={late_source})"
        )
        self._start(rid, total, mrope_delta, late_source)

    @precondition(lambda self: bool(self.taken_ids))
    @rule(data=st.data(), late_source=st.booleans())
    def reuse_id(self, data: st.DataObject, late_source: bool) -> None:
        """An id whose earlier life was taken is added again; its old statuses may be in flight."""
        rid = data.draw(st.sampled_from(self.taken_ids), label="id")
        self.taken_ids.remove(rid)
        total = self._draw_total(data)
        self._note(f"reuse_id({rid}, {total} tokens, late={late_source})")
        self._start(rid, total, 5, late_source)

    @precondition(lambda self: bool(self.pending_sources))
    @rule()
    def source_ready(self) -> None:
        rid, life = next(iter(self.pending_sources.items()))
        self._note(f"source_ready({rid})")
        del self.pending_sources[rid]
        self._late_add(rid, life)

    def _late_add(self, rid: Hashable, life: _Life) -> None:
        """The engine names the life its source is for (ids are reused, sources come late).

        The explorer checks the other way, sources bound in the order they are added.
        """
        kept = self.p.sender.add(
            rid, life.source, mrope_delta=life.mrope_delta, incarnation=life.incarnation
        )
        if not kept:  # the source of a life that ended there: it must be forgotten
            left = dict(self.p.sender.snapshot().cancelled).get(rid, ())
            require(NO_LEAK, tombstone_dropped(rid, life.incarnation, left))

    @rule(take=st.booleans())
    def receiver_step(self, take: bool) -> None:
        """One event-loop iteration; the engine may then take what finished."""
        self._note(f"receiver_step(take={take})")
        self._receiver_step(take)

    def _receiver_step(self, take: bool = False) -> None:
        ledger = self.ledger
        finished = step_served_in_order(
            self.p.receiver, lambda: self.t.polled, lambda rid, i: (rid, i) in ledger.cancels
        )
        if self.p.receiver.snapshot().resumes:
            type(self).resume_waits += 1
        if self.restart_pending and self.t.sender_alive:
            self._new_sender()  # the transport connected the new sender in this poll
        if take:
            for rid in finished:
                if rid in self.p.receiver:
                    self._take(rid)

    @rule()
    def sender_step(self) -> None:
        self._note("sender_step()")
        self._sender_step()

    def _sender_step(self) -> None:
        step_counted(self.p.sender, lambda: self.t.polled_posts)

    @rule()
    def both_step(self) -> None:
        """A receiver step then a sender step: the common, fault-free interleaving."""
        self._note("both_step()")
        self._receiver_step()
        self._sender_step()

    # -- benign faults: nothing may fail because of these ---------------------------

    @precondition(lambda self: any(type(s) in msg.ROUND_STATUSES for s in self.t.in_flight))
    @rule(data=st.data())
    def duplicate_status(self, data: st.DataObject) -> None:
        t = self.t
        candidates = [i for i, s in enumerate(t.in_flight) if type(s) in msg.ROUND_STATUSES]
        i = data.draw(st.sampled_from(candidates), label="status")
        self._note(f"duplicate_status({t.in_flight[i]!r})")
        t.duplicate(i)

    @precondition(lambda self: len(self.t.in_flight) > 1)
    @rule(seed=st.integers(0, 2**16))
    def reorder_statuses(self, seed: int) -> None:
        self._note(f"reorder_statuses(seed={seed})")
        self.t.shuffle(random.Random(seed))

    @rule(hold=st.sampled_from([False, False, True]))
    def delay_statuses(self, hold: bool) -> None:
        self._note(f"delay_statuses(hold={hold})")
        if hold:
            self.t.hold()
        else:
            self.t.release()

    def _deliver_now(self, status: object) -> None:
        """One receiver step that gets only ``status``; what was in flight stays there."""
        t = self.t
        saved, t.in_flight = t.in_flight, [status]  # type: ignore[list-item]
        held, t.held = t.held, False
        try:
            self._receiver_step()
        finally:
            t.in_flight, t.held = saved + t.in_flight, held

    @precondition(lambda self: bool(self.t.delivered_landed))
    @rule(data=st.data(), kind=st.sampled_from(FORGED))
    def replay_old_status(self, data: st.DataObject, kind: str) -> None:
        """A late duplicate of a status already delivered, or a refusal of that round
        (forged: the round was consumed), must change nothing."""
        t = self.t
        receiver = self.p.receiver
        # Aim where it matters: old statuses of requests still mid-transfer.
        mid_transfer = [
            s
            for s in t.delivered_landed
            if s.rid in receiver and receiver.record(s.rid).allocation is not None
        ]
        old = data.draw(st.sampled_from(mid_transfer or t.delivered_landed), label="old status")
        status: Status = old
        if kind != "landed" and old.rid in receiver:
            rec = receiver.record(old.rid)
            if rec.state is not TransferState.Transferring or old.epoch >= rec.epoch:
                return  # a refusal of the round before, of a request mid-transfer only
            if kind == "cancelled":
                status = msg.Cancelled(old.rid, old.epoch, incarnation=old.incarnation)
            else:
                status = msg.SenderError(old.rid, old.epoch, "forged", incarnation=old.incarnation)
        self._note(f"replay_old_status({status!r})")
        if (
            old.rid not in receiver
            or (old.rid, old.incarnation, old.epoch) in receiver.quarantined()
        ):
            return
        rec = receiver.record(old.rid)
        if rec.state is TransferState.WaitingForInput or (
            rec.state is TransferState.Transferring and rec.allocation is None
        ):
            return  # waiting for blocks: this step may legitimately serve it
        before = _snapshot(rec)
        self._deliver_now(status)
        require(PROGRESS, stale_changes_nothing(old.rid, before, _snapshot(rec)))

    @rule(grab=st.integers(-1, 4))
    def pool_pressure(self, grab: int) -> None:
        """Another user of the pool takes free blocks (``grab`` > 0) or returns some."""
        self._note(f"pool_pressure({grab})")
        a = self.p.allocator
        if grab <= 0:
            if self.pressure:
                a.free(self.pressure.pop())
            return
        n = min(grab, a.num_free_blocks)
        if n:
            got = a.allocate(n * a.block_size, PRESSURE)
            assert got is not None
            self.pressure.append(got)

    @rule(now=st.booleans())
    def grab_after_free(self, now: bool) -> None:
        """The other user takes what the next free returns, before the receiver can reuse it
        (with ``now``, every free block first): the next resume finds the pool empty."""
        self._note(f"grab_after_free(now={now})")
        a = self.allocator
        if now and a.num_free_blocks:
            got = a.allocate(a.num_free_blocks * a.block_size, PRESSURE)
            assert got is not None
            self.pressure.append(got)
        a.grab_armed = True

    @precondition(
        lambda self: any(
            type(s) is Landed and not s.final and msg.malformed_status(s) is None
            for s in self.t.in_flight
        )
    )
    @rule(data=st.data())
    def starve_a_resume(self, data: st.DataObject) -> None:
        """The other user empties the pool and grabs what the next free returns, then a
        partial round lands: its resume finds no block and has to wait."""
        landed = [
            i
            for i, s in enumerate(self.t.in_flight)
            if type(s) is Landed and not s.final and msg.malformed_status(s) is None
        ]
        # By position: a poisoned status can == this one (final=1 == final=True).
        status = self.t.in_flight.pop(data.draw(st.sampled_from(landed), label="landed round"))
        self._note(f"starve_a_resume({status!r})")
        a = self.allocator
        if a.num_free_blocks:
            got = a.allocate(a.num_free_blocks * a.block_size, PRESSURE)
            assert got is not None
            self.pressure.append(got)
        a.grab_armed = True
        self._deliver_now(status)

    # -- destructive faults: the requests they touch may fail, nothing may leak ------

    @precondition(
        lambda self: (
            bool(self.pressure)
            and bool(self.p.receiver.snapshot().resumes)
            and any(type(s) is Landed and not s.final for s in self.t.in_flight)
        )
    )
    @rule(data=st.data())
    def free_while_a_resume_waits(self, data: st.DataObject) -> None:
        """While a resume may wait, the other user returns blocks and another partial round
        lands in the same step: the waiting resume gets blocks first, no early post does."""
        landed = [i for i, s in enumerate(self.t.in_flight) if type(s) is Landed and not s.final]
        status = self.t.in_flight.pop(data.draw(st.sampled_from(landed), label="landed round"))
        self._note(f"free_while_a_resume_waits({status!r})")
        self.p.allocator.free(self.pressure.pop())
        self._deliver_now(status)

    def _draw_live(self, data: st.DataObject) -> Hashable | None:
        live = [rid for rid in self.lives if rid in self.p.receiver]
        if not live:
            return None
        return data.draw(st.sampled_from(live), label="request")

    def _hurt(self, rid: Hashable) -> None:
        life = self.lives.get(rid)
        if life is not None:
            life.hurt = True

    @precondition(lambda self: self.next_rid > 0)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = self._draw_live(data)
        self._note(f"abort({rid})")
        if rid is not None:
            self._hurt(rid)
            receiver = self.p.receiver
            before = receiver.snapshot()
            ended = receiver.abort(rid)
            require(ACCOUNTED, aborted_reported(before, receiver.snapshot(), rid, ended))

    @precondition(lambda self: self.next_rid > 0)
    @rule(
        data=st.data(),
        kind=st.sampled_from(FORGED),
        far=st.sampled_from([False, True, STALE, OLD, TRUNCATED, PREMATURE]),
    )
    def forge_status(self, data: st.DataObject, kind: str, far: bool | str) -> None:
        """A status for a round never posted (the next one, or one far ahead), at once; or
        one that must change nothing: (``stale``) for the round in flight's number of the
        id's earlier life, (``old``) for the round of this life consumed last; or a
        written round in flight, not the last, said to be final (``premature``) or to end
        the request (``truncated``)."""
        rid = self._draw_live(data)
        self._note(f"forge_status({rid}, {kind}, far={far})")
        if rid is None:
            return
        rec = self.p.receiver.record(rid)
        if far in (TRUNCATED, PREMATURE):
            self._forge_lie(rid, rec, far)
            return
        if far == STALE:
            self._forge_stale(rid, kind, self.earlier.get(rid))
            return
        if far == OLD:
            if rec.epoch and rec.state is TransferState.Transferring:
                self._forge_stale(rid, kind, rec.incarnation)
            return
        epoch, inc = rec.epoch + (FAR if far else 1), rec.incarnation
        forged: Status
        if kind == "landed":
            forged = Landed(rid, epoch, 1, (rec.total or 1) + 1, False, incarnation=inc)
        elif kind == "cancelled":
            forged = msg.Cancelled(rid, epoch, incarnation=inc)
        else:
            forged = msg.SenderError(rid, epoch, "forged", incarnation=inc)
        self._hurt(rid)
        self._deliver_now(forged)

    def _forge_lie(self, rid: Hashable, rec: RequestRecord, lie: str) -> None:
        """The round in flight written, not the last, and its Landed not yet seen: a Landed
        saying it is final (with the total) or ends the request (with a total of what it
        ends at). The sender wrote the truth (the aux row, the tokens it sent, the total
        that came with round 0); the request must not succeed."""
        a = rec.allocation
        if a is None or rec.state is not TransferState.Transferring:
            return
        entry = self.ledger.rounds.get(a.generation)
        if entry is None or not entry.written:
            return
        total = self.lives[rid].source.num_tokens
        if total - rec.sent <= a.capacity_tokens:
            return  # the last round: no lie to tell
        tokens = a.capacity_tokens
        said = rec.sent + tokens if lie == TRUNCATED else total
        self._hurt(rid)
        self._deliver_now(Landed(rid, rec.epoch, tokens, said, True, incarnation=rec.incarnation))

    def _forge_stale(self, rid: Hashable, kind: str, inc: int | None) -> None:
        """A forged status of ``rid``'s earlier life (``inc``), for the round number in flight,
        or of this life's round consumed last, must change nothing of this one."""
        if inc is None:
            return
        rec = self.p.receiver.record(rid)
        epoch = rec.epoch - 1 if inc == rec.incarnation else rec.epoch
        if (rid, inc, epoch) in self.p.receiver.quarantined():
            epoch += FAR  # that round of the earlier life may still be written: not it
        forged: Status
        if kind == "landed":
            forged = Landed(rid, epoch, 1, (rec.total or 1) + 1, False, incarnation=inc)
        elif kind == "cancelled":
            forged = msg.Cancelled(rid, epoch, incarnation=inc)
        else:
            forged = msg.SenderError(rid, epoch, "forged", incarnation=inc)
        waiting = rec.state is TransferState.WaitingForInput or (
            rec.state is TransferState.Transferring and rec.allocation is None
        )
        before = _snapshot(rec)
        self._deliver_now(forged)
        if not waiting:  # a waiting request may legitimately be served by this step
            require(PROGRESS, stale_changes_nothing(rid, before, _snapshot(rec)))

    @precondition(lambda self: self.next_rid > 0)
    @rule(
        data=st.data(),
        aimed=st.booleans(),
        where=st.sampled_from((*POISONED_STATUS, "total", STALE)),
    )
    def poison_batch(self, data: st.DataObject, aimed: bool, where: str) -> None:
        """A malformed item among the statuses in flight: one field of an unusable type.
        It may fail its own request only; one naming no live life (an ill-typed
        incarnation, the id's earlier life) fails no one."""
        rid = self._draw_live(data) if aimed else None
        self._note(f"poison_batch({rid}, {where})")
        bad: Any = ("not", "a", "status")
        if where == AHEAD and (rid is None or rid not in self.p.sender):
            return  # well typed: a sender without the source would park it for good
        if rid is not None:
            rec = self.p.receiver.record(rid)
            fields: dict[str, Any] = {
                "epoch": rec.epoch,
                "tokens": 1,
                "total": rec.total or 1,
                "final": False,
                "incarnation": rec.incarnation,
            }
            named: Any = rid
            if where == STALE:
                fields["incarnation"], fields["epoch"] = self.earlier.get(rid), None
            elif where == "rid":
                named = POISON_VALUES["rid"]  # unhashable: names no request
            else:
                fields[where] = POISON_VALUES.get(where, "1")
            if where not in ("incarnation", STALE, "rid"):
                self._hurt(rid)
            inc = fields.pop("incarnation")
            bad = Landed(named, **fields, incarnation=inc)
        self.t.in_flight.append(bad)

    @precondition(lambda self: self.next_rid > 0)
    @rule(
        data=st.data(),
        aimed=st.booleans(),
        where=st.sampled_from((*POISONED_POST, AHEAD, ASKEW, MISCOUNTED)),
    )
    def poison_post(self, data: st.DataObject, aimed: bool, where: str) -> None:
        """A malformed item after the posts already sent (posts keep their order), with
        one field of an unusable type; or (``ahead``) a post that skips a round, or
        (``askew``) one of the round the sender owes, resuming past what it sent, or
        (``miscounted``) one expecting a token more than that round carries."""
        rid = self._draw_live(data) if aimed else None
        self._note(f"poison_post({rid}, {where})")
        bad: Any = object()
        well_typed = where in (AHEAD, ASKEW, MISCOUNTED)
        if well_typed and (rid is None or rid not in self.p.sender):
            return  # well typed: a sender without the source would park it for good
        if rid is not None:
            rec = self.p.receiver.record(rid)
            fields: dict[str, Any] = {"blocks": (0,), "sent": rec.sent, "inc": rec.incarnation}
            named: Any = POISON_VALUES["rid"] if where == "rid" else rid
            if not well_typed and where not in ("rid", "cancel"):
                fields["inc" if where == "incarnation" else where] = POISON_VALUES[where]
            epoch, expect = rec.epoch + 2 if where == AHEAD else rec.epoch, None
            if where in (ASKEW, MISCOUNTED):
                owed = owed_round(self.p.sender.snapshot(), rid, rec.incarnation)
                if owed is None:
                    return  # its source is not bound at the sender (or fully sent)
                epoch, fields["sent"] = owed[0], owed[1] + (where == ASKEW)
                if where == MISCOUNTED:  # a token more than the one it carries
                    expect = 2
            bad = RoundPost(
                named,
                epoch,
                fields["blocks"],
                1,
                fields["sent"],
                None,
                expect,
                incarnation=fields["inc"],
            )
            if where == "cancel":  # a Cancel naming no life: it fails no one
                bad = msg.Cancel(rid, msg.NO_EPOCH, incarnation=POISON_VALUES["incarnation"])
            elif where not in ("incarnation", "rid"):
                self._hurt(rid)
        self.t.posts.append(bad)

    @rule(data=st.data())
    def bad_source(self, data: st.DataObject) -> None:
        """The encoder hands over a broken source: refused at once, nothing changes."""
        name, source = data.draw(st.sampled_from(bad_sources(4)), label="bad source")
        self._note(f"bad_source({name})")
        sender = self.p.sender
        before = _held(sender)
        try:
            sender.add(f"bad-{self.next_label}", source)  # type: ignore[arg-type]
        except InvalidArgumentError:
            pass
        else:
            raise InvariantViolation(INTEGRITY, f"the sender accepted a source with {name}")
        after = _held(sender)
        if before != after:
            raise InvariantViolation(INTEGRITY, f"refusing a source with {name} changed the sender")

    @precondition(lambda self: self.next_rid < MAX_REQUESTS)
    @rule(data=st.data())
    def unwritable_source(self, data: st.DataObject) -> None:
        """A source of another hidden size: it fails its own request, with the reason."""
        total = self._draw_total(data)
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        self._note(f"unwritable_source({rid}, {total} tokens)")
        self.next_label += 1
        life = _Life(labelled_source(total, self.next_label, hidden=HIDDEN + 1), 0, hurt=True)
        self.lives[rid] = life
        self.p.sources[rid] = life.source
        life.incarnation = self.p.receiver.add(rid)
        self._late_add(rid, life)

    @precondition(lambda self: not self.crashed and not self.restart_pending)
    @rule(mid_round=st.booleans(), now=st.sampled_from([False, False, False, True]))
    def crash_sender(self, mid_round: bool, now: bool) -> None:
        """Kill the sender (drawn rarely: everything after it is failure handling)."""
        self._note(f"crash_sender(mid_round={mid_round}, now={now})")
        if not now:
            return
        self.crashed = True
        for life in self.lives.values():
            life.hurt = True
        if mid_round:
            self.t.crash_after_next_write = True
        else:
            self.t.crash_sender()

    @precondition(lambda self: not self.crashed and not self.restart_pending)
    @rule(now=st.sampled_from([False, False, True]))
    def restart_sender(self, now: bool) -> None:
        """The sender restarts with no records; a fresh one serves the requests added after."""
        self._note(f"restart_sender(now={now})")
        if not now:
            return
        for rid, life in self.lives.items():
            if rid in self.p.receiver:
                life.hurt = True
        # What the old encoder had not finished for started requests dies with it.
        self.pending_sources.clear()
        self.restart_pending = True
        self.t.restart_sender()

    def _new_sender(self) -> None:
        self.restart_pending = False
        self.p.sender = EmbeddingSender(self.t)

    # -- the engine takes what finished --------------------------------------------

    def _take(self, rid: Hashable) -> None:
        receiver = self.p.receiver
        self.taken.append((rid, weakref.ref(receiver.record(rid))))
        result = receiver.take(rid)
        life = self.lives.pop(rid)
        self.taken_ids.append(rid)
        consumed = sum(1 for k in self.ledger.consumed if k[:2] == (rid, life.incarnation))
        require(ACCOUNTED, rounds_counted(rid, result.rounds, consumed))
        if not life.hurt:
            require(LIVENESS, succeeds_without_faults(rid, result.state.name, result.reason))
        if result.state is TransferState.Failed:
            require(LIVENESS, None if result.reason else f"request {rid!r} failed with no reason")
        if result.output is not None:
            require(INTEGRITY, output_intact(rid, result.output.equal(life.source)))
            total = life.source.num_tokens
            if result.total_tokens != total or result.mrope_delta != life.mrope_delta:
                raise InvariantViolation(
                    INTEGRITY,
                    f"request {rid!r} reports {result.total_tokens} tokens and mRoPE delta "
                    f"{result.mrope_delta}; the sender announced {total} and {life.mrope_delta}",
                )
        del self.p.sources[rid]

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
        self.allocator.grab_armed = False
        # The pool's other user keeps, for good, what leaves room for a default round: with
        # "auto", the largest round 0 the sizer may choose, now or once it has seen the
        # totals still to finish (it learns from them during this delivery).
        sizer = p.receiver.sizer
        round0 = self.cfg.default_tokens
        if sizer is not None:
            chosen = [t for _, t in sizer.snapshot().choice]
            seen = [s.num_tokens for s in p.sources.values()]
            round0 = max([round0, *chosen, min(max(seen, default=0), sizer.max_tokens)])
        keep = p.allocator.num_blocks - p.allocator.blocks_for(round0)
        while sum(len(a.blocks) for a in self.pressure) > keep:
            p.allocator.free(self.pressure.pop())
        for rid, life in list(self.pending_sources.items()):
            self._late_add(rid, life)
        self.pending_sources.clear()
        bound = sum(p.step_bound(s.num_tokens) for s in p.sources.values()) + 16
        idle = 0
        for _ in range(bound):
            if not p.live() and not self.restart_pending:
                break
            before = p.traffic()
            self._receiver_step()
            self._sender_step()
            # Both sides are deterministic: two steps that move nothing mean stuck for good.
            quiet = not self.t.in_flight and not self.t.posts and not self.restart_pending
            idle = idle + 1 if quiet and p.traffic() == before else 0
            if idle >= 2:
                break
        require(LIVENESS, terminates(p.live(), bound))
        for rid in list(p.sources):
            self._take(rid)
        while self.pressure:
            p.allocator.free(self.pressure.pop())
        for _ in range(4):  # late statuses release the quarantine
            self._receiver_step()
            self._sender_step()
        sender_left = 0 if self.crashed else len(p.sender) + p.sender.parked_posts
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


def _poison_outputs(buffers: Any) -> None:
    """Make ``buffers`` hand out outputs of -1s, which no source's tokens equal, instead of
    uninitialised memory: a freed output of the same source could lie there, and whether
    an unwritten token is caught, and with it the verdict, would depend on what the
    process allocated before."""
    make = buffers.new_output

    def poisoned(num_tokens: int) -> EmbeddingTensors:
        out: EmbeddingTensors = make(num_tokens)
        for tensor in (out.embeddings, out.fill_ids, out.mrope):
            tensor.fill_(-1)
        return out

    buffers.new_output = poisoned


def protocol_machine(strategy_name: str = "epoch") -> type[ProtocolMachineBase]:
    """The protocol machine with the receiver deciding rounds by ``strategy_name``."""
    strategy(strategy_name)  # validates the name
    name = f"ProtocolMachine_{strategy_name.replace('-', '_')}"
    return type(name, (ProtocolMachineBase,), {"strategy_name": strategy_name})


__all__ = ["CheckedAllocator", "CheckedTransport", "ProtocolMachineBase", "protocol_machine"]
