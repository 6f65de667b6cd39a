"""The real receiver, sender and allocator wired for the bounded explorer.

The explorer does not check a copy of the protocol: every state it visits is a
:class:`World` holding a real :class:`~resumekit.protocol.ResumableReceiver`,
:class:`~resumekit.protocol.EmbeddingSender` and
:class:`~resumekit.allocator.BlockAllocator`, and every action calls their
public API. Only the torch storage is replaced, by :class:`CellBuffers`, whose
every token slot remembers which token of which request life was written into
it, so integrity is checked token by token; the fuzzer runs the real
:class:`~resumekit.allocator.BlockBuffers`.

A state is a :class:`WorldState`: an immutable value made of the snapshots each
shipped object takes of itself (``snapshot()``) and the checker's own parts. The
explorer keeps states, not objects: to follow an action it puts one world back
into a state (``restore()``), applies the action through the real objects'
API, and takes the successor's state. The state's abstraction, its key, is in
:mod:`resumekit.properties.abstraction`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import torch

from resumekit.allocator.block_allocator import Allocation, AllocatorSnapshot, BlockAllocator
from resumekit.allocator.buffers import DEFAULT_AUX_SIZE, EmbeddingTensors
from resumekit.errors import InvariantError
from resumekit.properties.invariants import (
    ACCOUNTED,
    INTEGRITY,
    NO_LEAK,
    NO_WRITE_AFTER_FREE,
    InvariantViolation,
    cancel_names_quarantined,
    reports_a_round,
    require,
    tokens_in_place,
)
from resumekit.properties.ledger import Ledger
from resumekit.properties.strategies import KVPollReceiver, stamp_progress
from resumekit.protocol import messages as msg
from resumekit.protocol.receiver import ReceiverSnapshot, ResumableReceiver
from resumekit.protocol.sender import EmbeddingSender, SenderSnapshot

PRESSURE: Final = "pressure"  # the owner of blocks another pool user holds
MROPE_BASE: Final = 1000  # life ``label`` announces mRoPE delta ``MROPE_BASE + label``


class Span(NamedTuple):
    """What the sender hands the transport: tokens ``[start, start + n)`` of one life."""

    label: int
    start: int
    num_tokens: int


@dataclass(frozen=True)
class TokenSource(EmbeddingTensors):
    """A source whose token ``i`` is ``(label, i)``: tiny tensors pass the sender's checks,
    and :meth:`narrow` returns a :class:`Span` the explorer's transport writes as cells."""

    label: int = 0

    @classmethod
    def make(cls, label: int, num_tokens: int) -> TokenSource:
        ids = torch.arange(num_tokens, dtype=torch.int32)
        return cls(ids.to(torch.bfloat16).unsqueeze(1), ids, ids.expand(3, num_tokens), label)

    def narrow(self, start: int, length: int) -> Span:  # type: ignore[override]
        return Span(self.label, start, length)


class CellOutput:
    """An output :class:`CellBuffers` made for the receiver: a handle, whose cells are
    kept in the buffers (``outputs``), so that everything a state holds is a value."""

    __slots__ = ("num_tokens",)

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens


class CellBuffers:
    """Stands in for :class:`~resumekit.allocator.BlockBuffers` with one cell per token slot.

    A cell is ``(label, position)``: the token of which life the sender wrote
    there. Reads check through the :class:`Ledger` that the round was written
    and is read once, and that every token read is the one the output expects.
    """

    def __init__(self, allocator: BlockAllocator, ledger: Ledger) -> None:
        self.allocator = allocator
        self.ledger = ledger
        self.hidden_size = 1
        self.block_size = allocator.block_size
        # Tuples, replaced on write: a copied world shares them until one of them writes.
        self.cells: tuple[tuple[int, int] | None, ...] = (None,) * (
            allocator.num_blocks * allocator.block_size
        )
        self.aux: tuple[tuple[int, ...], ...] = ((0,) * DEFAULT_AUX_SIZE,) * allocator.num_blocks
        self.outputs: dict[CellOutput, tuple[tuple[int, int] | None, ...]] = {}
        self.outputs_shared = False  # with a state: copied before the next change

    def _own_outputs(self) -> dict[CellOutput, tuple[tuple[int, int] | None, ...]]:
        if self.outputs_shared:
            self.outputs = self.outputs.copy()
            self.outputs_shared = False
        return self.outputs

    def new_output(self, num_tokens: int) -> CellOutput:
        out = CellOutput(num_tokens)
        self._own_outputs()[out] = (None,) * num_tokens
        return out

    def read_aux(self, allocation: Allocation) -> tuple[int, ...]:
        self.allocator.check_live(allocation)
        self.ledger.reading(allocation, "read_aux")
        return self.aux[allocation.blocks[0]]

    def read_into(self, allocation: Allocation, n: int, out: CellOutput, offset: int) -> None:
        self.allocator.check_live(allocation)
        into = list(self.outputs[out])
        if not 1 <= n <= allocation.capacity_tokens or offset < 0 or offset + n > len(into):
            raise InvariantViolation(
                INTEGRITY,
                f"read of {n} token(s) at offset {offset} from a round of "
                f"{allocation.capacity_tokens} into an output of {len(into)}",
            )
        label, epoch = self.ledger.consume(allocation)
        bs, cells, blocks = self.block_size, self.cells, allocation.blocks
        for i in range(n):
            cell = cells[blocks[i // bs] * bs + i % bs]
            if cell != (label, offset + i):
                raise InvariantViolation(
                    INTEGRITY, tokens_in_place(f"life {label}", epoch, offset + i, cell) or ""
                )
            into[offset + i] = cell
        self._own_outputs()[out] = tuple(into)

    def write(self, allocation: Allocation, span: Span, aux: Sequence[int] | None) -> None:
        bs, cells, blocks = self.block_size, list(self.cells), allocation.blocks
        label, start, n = span
        for i in range(n):
            cells[blocks[i // bs] * bs + i % bs] = (label, start + i)
        self.cells = tuple(cells)
        row = tuple(aux) if aux is not None else ()
        b = blocks[0]
        self.aux = (*self.aux[:b], row + (0,) * (DEFAULT_AUX_SIZE - len(row)), *self.aux[b + 1 :])


class CheckedAllocator(BlockAllocator):
    """The real allocator; the ledger checks every block it hands out and every free.

    It also plays the pool's other user: ``pressure`` holds what that user took,
    and with ``grab_armed`` it takes a block right after the next free, before
    whoever freed can allocate again, so a resume finds the pool empty and waits.
    """

    ledger: Ledger
    pressure: tuple[Allocation, ...] = ()
    grab_armed: bool = False
    # Free blocks just before each allocation of the current receiver step, by generation
    # (the step's check reads it: resumes_sized); emptied before each step. Set by the harness.
    free_before: dict[int, int]

    def squeeze(self) -> None:
        """The other user takes one free block."""
        got = BlockAllocator.allocate(self, self.block_size, PRESSURE)
        assert got is not None
        self.ledger.issued(got)
        self.pressure += (got,)

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        free = self.num_free_blocks
        allocation = super().allocate(num_tokens, owner)
        if allocation is not None:
            self.ledger.issued(allocation)
            self.free_before[allocation.generation] = free
        return allocation

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int = 1
    ) -> Allocation | None:
        free = self.num_free_blocks
        allocation = super().allocate_up_to(num_tokens, owner, min_tokens)
        if allocation is not None:
            self.ledger.issued(allocation)
            self.free_before[allocation.generation] = free
        return allocation

    def free(self, allocation: Allocation) -> None:
        self.ledger.freeing(allocation, self.is_live(allocation))
        super().free(allocation)
        if self.grab_armed and allocation.owner != PRESSURE:
            self.grab_armed = False
            self.squeeze()


class ExplorerTransport:
    """Both ends of the protocol, delivering exactly what the explorer chooses.

    Posts travel in order; statuses are a multiset the explorer delivers one at
    a time (or all at once). Connection events
    (:class:`~resumekit.protocol.messages.PeerLost`,
    :class:`~resumekit.protocol.messages.PeerBack`) are ``events``, delivered in the
    order they happened, as a real link reports a loss before the reconnection after it. ``deliver``
    and ``hand_over`` hold what the next ``poll_statuses`` and ``poll_posts``
    return.
    """

    def __init__(self, buffers: CellBuffers, ledger: Ledger) -> None:
        self.buffers = buffers
        self.ledger = ledger
        # Tuples, replaced on change, so copying a world shares them.
        self.posts: tuple[msg.Post, ...] = ()
        self.statuses: tuple[msg.Status, ...] = ()
        self.events: tuple[msg.PeerLost | msg.PeerBack, ...] = ()
        self.deliver: tuple[msg.Status, ...] = ()
        self.hand_over: tuple[msg.Post, ...] = ()
        self.sender_alive = True
        self.crash_armed = False
        self.restarting = False  # a restart waits for the receiver to see the loss
        self.loss_seen = False  # ... and to have handled it (the poll after)
        self.new_sender = False  # the restart happened: the harness connects a fresh sender
        self.admitted = 0  # round 0 posts so far (the fairness check counts them per step)
        self.polled: Sequence[object] = ()  # what the last poll returned, for invariant 8
        self.polled_posts: Sequence[object] = ()
        self.receiver: ResumableReceiver | None = None  # set once built: its quarantine

    def check_request_id(self, rid: Hashable) -> None:
        """Any id travels here."""

    # receiver end
    def post_round(self, post: msg.RoundPost) -> None:
        self.ledger.posted(post)
        if post.epoch == 0:
            self.admitted += 1
        if self.sender_alive:
            self.posts += (post,)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        self.ledger.cancelled(rid, incarnation)
        if self.receiver is not None:  # the receiver quarantines before it cancels
            quarantined = self.receiver.quarantined()
            require(NO_LEAK, cancel_names_quarantined(rid, incarnation, epoch, quarantined))
        if self.sender_alive:
            self.posts += (msg.Cancel(rid, epoch, incarnation=incarnation),)

    def poll_statuses(self) -> Sequence[msg.Status]:
        # As InProcessTransport.restart_sender: once the receiver has handled the loss
        # (the poll after the one that reported it), a fresh sender is connected.
        if self.loss_seen:
            self.loss_seen = False
            self.posts = ()
            self.sender_alive = True
            self.new_sender = True
            self.events += (msg.PeerBack("a new sender is connected"),)
        batch, self.deliver = self.deliver, ()
        if self.restarting and any(type(s) is msg.PeerLost for s in batch):
            self.restarting = False
            self.loss_seen = True
        self.polled = batch
        return batch

    # sender end
    def poll_posts(self) -> Sequence[msg.Post]:
        batch, self.hand_over = self.hand_over, ()
        self.polled_posts = batch
        return batch

    def write_round(self, post: msg.RoundPost, data: Any, aux: Sequence[int] | None) -> None:
        if not self.sender_alive:
            return
        allocation = post.allocation
        if allocation is None or not isinstance(data, Span):
            raise InvariantViolation(INTEGRITY, f"the sender wrote {data!r} for {post!r}")
        if data.num_tokens > allocation.capacity_tokens or data.num_tokens < 1:
            raise InvariantViolation(
                NO_WRITE_AFTER_FREE,
                f"the sender wrote {data.num_tokens} token(s) into a round of "
                f"{allocation.capacity_tokens}",
            )
        self.ledger.written(post, self.buffers.allocator.is_live(allocation))
        # Every design's rounds carry the sent-tokens design's marker: one world for all.
        self.buffers.write(allocation, data, stamp_progress(post, data.num_tokens, aux))
        if self.crash_armed:
            self.crash()

    def report(self, status: msg.Landed | msg.Cancelled | msg.SenderError) -> None:
        problem = msg.malformed_status(status)
        if problem is not None:  # what a real transport refuses to send (require_status)
            raise InvariantViolation(ACCOUNTED, f"the sender reported {status!r}: {problem}")
        require(ACCOUNTED, reports_a_round(status))
        if self.sender_alive:
            self.statuses += (status,)

    def crash(self, reason: str = "sender crashed") -> None:
        self.sender_alive = False
        self.crash_armed = False
        self.posts = ()
        self.events += (msg.PeerLost(reason),)

    _FIELDS: Final = (
        "posts",
        "statuses",
        "events",
        "deliver",
        "hand_over",
        "sender_alive",
        "crash_armed",
        "restarting",
        "loss_seen",
        "new_sender",
        "admitted",
    )

    def snapshot(self) -> tuple[Any, ...]:
        """Every field (each immutable) in :data:`_FIELDS` order."""
        d = self.__dict__
        return tuple([d[f] for f in self._FIELDS])

    def restore(self, state: tuple[Any, ...]) -> None:
        self.__dict__.update(zip(self._FIELDS, state, strict=True))


# -- a world and its state --------------------------------------------------------------


class WorldState(NamedTuple):
    """One state of the explorer: what every object of a :class:`World` holds, as values.

    The shipped objects' parts are their own snapshots; the rest is the checker's,
    all values (a receiver's outputs are :class:`CellOutput` handles, their cells in
    ``outputs``), so nothing in a state changes when a world runs on from it.
    """

    receiver: ReceiverSnapshot
    memos: tuple[tuple[tuple[Hashable, int], object], ...]  # a reference design's memory
    sender: SenderSnapshot
    allocator: AllocatorSnapshot
    pressure: tuple[Allocation, ...]  # what the pool's other user holds
    grab_armed: bool
    cells: tuple[tuple[int, int] | None, ...]
    aux: tuple[tuple[int, ...], ...]
    outputs: dict[CellOutput, tuple[tuple[int, int] | None, ...]]  # shared, never changed
    transport: tuple[Any, ...]
    ledger: tuple[dict[Any, Any], ...]
    # The harness's own, per request:
    totals: tuple[int, ...]  # in tokens
    added: tuple[bool, ...]  # its current life has been added to the receiver
    encoded: tuple[bool, ...]  # its current life's source went to the sender
    lives: tuple[int, ...]  # how many lives it has had (the current one counts)
    budget: tuple[int, ...]  # what each fault may still spend
    hurt: tuple[bool, ...]  # a fault aimed at its current life


class World:
    """The real objects one exploration runs, plus what the adversary has left to do."""

    receiver: ResumableReceiver
    sender: EmbeddingSender
    allocator: CheckedAllocator
    buffers: CellBuffers
    transport: ExplorerTransport
    ledger: Ledger
    # Tuples, replaced on change (see WorldState).
    totals: tuple[int, ...]
    added: tuple[bool, ...]
    encoded: tuple[bool, ...]
    lives: tuple[int, ...]
    budget: tuple[int, ...]
    hurt: tuple[bool, ...]

    def snapshot(self) -> WorldState:
        receiver = self.receiver
        memos = getattr(receiver, "memos", None) if isinstance(receiver, KVPollReceiver) else None
        a = self.allocator
        return WorldState(
            receiver.snapshot(),
            tuple(memos.items()) if memos else (),
            self.sender.snapshot(),
            a.snapshot(),
            a.pressure,
            a.grab_armed,
            self.buffers.cells,
            self.buffers.aux,
            self._shared_outputs(),
            self.transport.snapshot(),
            self.ledger.snapshot(),
            self.totals,
            self.added,
            self.encoded,
            self.lives,
            self.budget,
            self.hurt,
        )

    def _shared_outputs(self) -> dict[CellOutput, tuple[tuple[int, int] | None, ...]]:
        self.buffers.outputs_shared = True
        return self.buffers.outputs

    def restore(self, s: WorldState) -> None:
        """Put every object back into ``s``, through the shipped objects' ``restore``."""
        a = self.allocator
        a.restore(s.allocator)
        a.pressure, a.grab_armed = s.pressure, s.grab_armed
        receiver = self.receiver
        receiver.restore(s.receiver)
        if isinstance(receiver, KVPollReceiver):
            receiver.memos = dict(s.memos)
        self.sender.restore(s.sender)
        # Each holds what it was given: a restore that kept its state would have the
        # explorer run on from states it never reached, without end.
        if receiver.snapshot() is not s.receiver or self.sender.snapshot() is not s.sender:
            raise InvariantError("a restore left the receiver or the sender in another state")
        buffers = self.buffers
        buffers.cells, buffers.aux, buffers.outputs = s.cells, s.aux, s.outputs
        buffers.outputs_shared = True
        self.transport.restore(s.transport)
        self.ledger.restore(s.ledger)
        self.totals, self.added, self.encoded = s.totals, s.added, s.encoded
        self.lives, self.budget, self.hurt = s.lives, s.budget, s.hurt


def replaced(values: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
    """``values`` with item ``i`` replaced: a world's tuples are replaced, never changed."""
    return (*values[:i], value, *values[i + 1 :])


def spend(budget: tuple[int, ...], i: int) -> tuple[int, ...]:
    """``budget`` with one fault of index ``i`` spent."""
    return replaced(budget, i, budget[i] - 1)


__all__ = [
    "MROPE_BASE",
    "PRESSURE",
    "CellBuffers",
    "CellOutput",
    "CheckedAllocator",
    "ExplorerTransport",
    "Span",
    "TokenSource",
    "World",
    "WorldState",
    "replaced",
    "spend",
]
