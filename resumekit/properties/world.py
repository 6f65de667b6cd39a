"""The real receiver, sender and allocator wired for the bounded explorer.

The explorer does not check a copy of the protocol: every state it visits is a
:class:`World` holding a real :class:`~resumekit.statemachine.ResumableReceiver`,
:class:`~resumekit.statemachine.EmbeddingSender` and
:class:`~resumekit.allocator.BlockAllocator`, and every action calls their
public API. Only the torch storage is replaced, by :class:`CellBuffers`, whose
every token slot remembers which token of which request life was written into
it, so integrity is checked token by token; the fuzzer runs the real
:class:`~resumekit.allocator.BlockBuffers`.

Three things make that affordable. :func:`clone` copies a world's object graph
with a type table (immutable values are shared); :meth:`World.key` abstracts a
world into a hashable tuple with two symmetry reductions, sound because the
protocol compares generations and block numbers only for identity: live
allocations are named by age, blocks by their position in the free list and
the live allocations; and a freed block's stale content is left out, because a
read of a round the sender has not written is itself a violation (the ledger's
``written`` check), so stale bytes can never matter without one.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter
from typing import Any, Final, NamedTuple

import torch

from resumekit.allocator.block_allocator import Allocation, BlockAllocator
from resumekit.allocator.buffers import DEFAULT_AUX_SIZE, EmbeddingTensors
from resumekit.properties.invariants import (
    EXACTLY_ONCE,
    INTEGRITY,
    NO_WRITE_AFTER_FREE,
    InvariantViolation,
    allocation_freed_once,
    allocation_posted_once,
    round_consumed_once,
    round_landed_before_consumed,
    tokens_in_place,
    write_into_live_round,
)
from resumekit.statemachine import messages as msg
from resumekit.statemachine.declaration import TransferState

PRESSURE: Final = "pressure"  # the owner of blocks another pool user holds


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


class Ledger:
    """The explorer's checker: what it saw posted, written, read and freed, per live allocation.

    ``rounds`` maps a live generation to ``(label, epoch, posts, written, consumed)``;
    ``consumed`` maps a life's label to the last epoch consumed; ``owner`` maps a
    block to the live generation holding it (the allocator's claims, checked);
    ``lives`` maps an incarnation the receiver gave to the life's number for its id.
    """

    def __init__(self) -> None:
        self.rounds: dict[int, tuple[int, int, int, bool, bool]] = {}
        self.consumed: dict[int, int] = {}
        self.labels: dict[Hashable, int] = {}  # request id -> the label of its current life
        self.owner: dict[int, int] = {}
        self.lives: dict[int, int] = {}

    def issued(self, allocation: Allocation) -> None:
        g = allocation.generation
        owner = self.owner
        for b in allocation.blocks:
            if b in owner:
                raise InvariantViolation(
                    EXACTLY_ONCE,
                    f"block {b} handed to generation {g} while generation {owner[b]} holds it",
                )
            owner[b] = g

    def freeing(self, allocation: Allocation, live: bool) -> None:
        g = allocation.generation
        if not live or any(self.owner.get(b) != g for b in allocation.blocks):
            raise InvariantViolation(EXACTLY_ONCE, allocation_freed_once(g, False) or "")
        for b in allocation.blocks:
            del self.owner[b]
        self.rounds.pop(g, None)

    def posted(self, post: msg.RoundPost) -> None:
        allocation = post.allocation
        assert allocation is not None
        g = allocation.generation
        known = self.rounds.get(g)
        posts = 1 if known is None else known[2] + 1
        if posts > 1:
            raise InvariantViolation(EXACTLY_ONCE, allocation_posted_once(g, posts) or "")
        if post.blocks != allocation.blocks or post.capacity_tokens != allocation.capacity_tokens:
            raise InvariantViolation(
                INTEGRITY,
                f"round {post.epoch} of request {post.rid!r} names blocks {list(post.blocks)} "
                f"({post.capacity_tokens} tokens); its allocation holds {list(allocation.blocks)} "
                f"({allocation.capacity_tokens})",
            )
        label = self.labels.get(post.rid, -1)
        self.rounds[g] = (label, post.epoch, posts, False, False)

    def written(self, post: msg.RoundPost, live: bool) -> None:
        allocation = post.allocation
        assert allocation is not None
        g = allocation.generation
        if not live or any(self.owner.get(b) != g for b in allocation.blocks):
            raise InvariantViolation(
                NO_WRITE_AFTER_FREE, write_into_live_round(post.rid, post.epoch, g, False) or ""
            )
        label, epoch, posts, _, consumed = self.rounds.get(g, (-1, post.epoch, 0, False, False))
        self.rounds[g] = (label, epoch, posts, True, consumed)

    def reading(self, allocation: Allocation, what: str) -> tuple[int, int]:
        """The (label, epoch) of the round in ``allocation``; it must have been written."""
        g = allocation.generation
        known = self.rounds.get(g)
        if known is None or not known[3]:
            epoch = -1 if known is None else known[1]
            raise InvariantViolation(
                INTEGRITY,
                (round_landed_before_consumed(allocation.owner, epoch, False) or "") + f" ({what})",
            )
        return known[0], known[1]

    def consume(self, allocation: Allocation) -> tuple[int, int]:
        label, epoch = self.reading(allocation, "read_into")
        g = allocation.generation
        known = self.rounds[g]
        last = self.consumed.get(label, -1)
        if known[4] or epoch <= last:
            raise InvariantViolation(EXACTLY_ONCE, round_consumed_once(label, epoch, True) or "")
        self.rounds[g] = (*known[:4], True)
        self.consumed[label] = epoch
        return label, epoch


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

    def new_output(self, num_tokens: int) -> list[tuple[int, int] | None]:
        return [None] * num_tokens

    def read_aux(self, allocation: Allocation) -> tuple[int, ...]:
        self.allocator.check_live(allocation)
        self.ledger.reading(allocation, "read_aux")
        return self.aux[allocation.blocks[0]]

    def read_into(
        self, allocation: Allocation, n: int, out: list[tuple[int, int] | None], offset: int
    ) -> None:
        self.allocator.check_live(allocation)
        if not 1 <= n <= allocation.capacity_tokens or offset < 0 or offset + n > len(out):
            raise InvariantViolation(
                INTEGRITY,
                f"read of {n} token(s) at offset {offset} from a round of "
                f"{allocation.capacity_tokens} into an output of {len(out)}",
            )
        label, epoch = self.ledger.consume(allocation)
        bs, cells, blocks = self.block_size, self.cells, allocation.blocks
        for i in range(n):
            cell = cells[blocks[i // bs] * bs + i % bs]
            if cell != (label, offset + i):
                raise InvariantViolation(
                    INTEGRITY, tokens_in_place(f"life {label}", epoch, offset + i, cell) or ""
                )
            out[offset + i] = cell

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

    def squeeze(self) -> None:
        """The other user takes one free block."""
        got = BlockAllocator.allocate(self, self.block_size, PRESSURE)
        assert got is not None
        self.ledger.issued(got)
        self.pressure += (got,)

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        allocation = super().allocate(num_tokens, owner)
        if allocation is not None:
            self.ledger.issued(allocation)
        return allocation

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int = 1
    ) -> Allocation | None:
        allocation = super().allocate_up_to(num_tokens, owner, min_tokens)
        if allocation is not None:
            self.ledger.issued(allocation)
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
    a time (or all at once). Connection events (:class:`PeerLost`,
    :class:`PeerBack`) are ``events``, delivered in the order they happened, as
    a real link reports a loss before the reconnection after it. ``deliver``
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

    # receiver end
    def post_round(self, post: msg.RoundPost) -> None:
        self.ledger.posted(post)
        if post.epoch == 0:
            self.admitted += 1
        if self.sender_alive:
            self.posts += (post,)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
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
        return batch

    # sender end
    def poll_posts(self) -> Sequence[msg.Post]:
        batch, self.hand_over = self.hand_over, ()
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
        self.buffers.write(allocation, data, aux)
        if self.crash_armed:
            self.crash()

    def report(self, status: msg.Landed | msg.Cancelled | msg.SenderError) -> None:
        if self.sender_alive:
            self.statuses += (status,)

    def crash(self, reason: str = "sender crashed") -> None:
        self.sender_alive = False
        self.crash_armed = False
        self.posts = ()
        self.events += (msg.PeerLost(reason),)


# -- clone: a world's object graph, copied with a type table ---------------------------

_ATOMS: Final[set[type]] = {
    int,
    str,
    bool,
    float,
    bytes,
    type(None),
    tuple,
    frozenset,
    Allocation,
    TokenSource,
    Span,
    TransferState,
    msg.RoundPost,
    msg.Cancel,
    msg.Landed,
    msg.Cancelled,
    msg.SenderError,
    msg.PeerLost,
    msg.PeerBack,
}
_UNSET: Final = object()
_NO_SLOTS: Final = ((), None)
_SLOTS: dict[type, tuple[tuple[str, ...], Any]] = {}


def share_as_immutable(*kinds: type) -> None:
    """Let :func:`clone` share objects of these types (round filters, enums) instead of copying."""
    _ATOMS.update(kinds)


def _slot_plan(tp: type) -> tuple[tuple[str, ...], Any]:
    """The slots of ``tp`` and one getter for all of them, or ``_NO_SLOTS``."""
    names: list[str] = []
    for klass in tp.__mro__:
        raw = klass.__dict__.get("__slots__", ())
        for name in (raw,) if isinstance(raw, str) else raw:
            if name not in ("__weakref__", "__dict__") and name not in names:
                names.append(name)
    if not names:
        return _NO_SLOTS
    get = attrgetter(*names)
    return tuple(names), (get if len(names) > 1 else lambda o: (get(o),))


def clone(obj: Any, memo: dict[int, Any]) -> Any:
    """A copy of ``obj`` sharing every immutable value; shared references stay shared."""
    tp = type(obj)
    atoms = _ATOMS
    if tp in atoms:
        return obj
    got = memo.get(id(obj))
    if got is not None:
        return got
    if tp is dict:
        new_d = obj.copy()
        memo[id(obj)] = new_d
        for k, v in new_d.items():  # replacing values keeps the size: iteration stays valid
            if type(v) not in atoms:
                new_d[k] = clone(v, memo)
        return new_d
    if tp is list:
        new_l = obj.copy()
        memo[id(obj)] = new_l
        for i, v in enumerate(new_l):
            if type(v) not in atoms:
                new_l[i] = clone(v, memo)
        return new_l
    if tp is deque:
        new_q = deque([v if type(v) in atoms else clone(v, memo) for v in obj])
        memo[id(obj)] = new_q
        return new_q
    if tp is types.MethodType:
        bound = getattr(clone(obj.__self__, memo), obj.__func__.__name__)
        memo[id(obj)] = bound
        return bound
    if isinstance(obj, Enum):
        return obj
    new = object.__new__(tp)
    memo[id(obj)] = new
    plan = _SLOTS.get(tp)
    if plan is None:
        plan = _SLOTS[tp] = _slot_plan(tp)
    if plan is not _NO_SLOTS:
        names, get = plan
        setter = object.__setattr__
        try:
            values = get(obj)
        except AttributeError:  # a slot never assigned: copy the assigned ones one by one
            values = tuple(getattr(obj, n, _UNSET) for n in names)
        for name, v in zip(names, values, strict=True):
            if v is not _UNSET:
                setter(new, name, v if type(v) in atoms else clone(v, memo))
    d = getattr(obj, "__dict__", None)
    if d is not None:
        d = d.copy()
        for k, v in d.items():
            if type(v) not in atoms:
                d[k] = clone(v, memo)
        new.__dict__ = d
    return new


# -- copy_world: the same copy, specialised to the shipped classes -------------------------

_RECEIVER_REFS: Final = ("buffers", "allocator", "transport")
_RECEIVER_ATOMS: Final = frozenset(
    {
        "default_allocate_tokens",
        "max_resume_tokens",
        "sizer",  # only when None (a fixed round 0); a learning one is cloned
        "round_filter",
        "observer",
        "stale_statuses",
        "orphan_statuses",
        "malformed_statuses",
        "peer_lost",
        "_next_incarnation",
    }
)
_RECEIVER_SHAPE: Final = frozenset(
    {*_RECEIVER_REFS, *_RECEIVER_ATOMS, "_records", "_admissions", "_resumes"}
    | {"_quarantine", "_finished"}
)
_SENDER_SHAPE: Final = frozenset(
    {"transport", "_lives", "_parked", "_cancelled", "_ended", "max_tombstones"}
    | {"rounds_served", "repeated_posts", "stale_posts", "malformed_posts"}
)
_ALLOCATOR_SHAPE: Final = frozenset(
    {"_num_blocks", "_block_size", "_reuse", "_free", "_take", "_give", "_num_free"}
    | {"_pool_id", "_next_generation", "_live", "_by_owner", "ledger"}
)
_ALLOCATOR_EXTRAS: Final = frozenset({"pressure", "grab_armed"})  # set only once used
_new = object.__new__


def _copy_slots(obj: Any) -> Any:
    """A copy of a slotted record whose every slot holds an immutable value or a list of them."""
    tp = type(obj)
    plan = _SLOTS.get(tp)
    if plan is None:
        plan = _SLOTS[tp] = _slot_plan(tp)
    names, get = plan
    new = _new(tp)
    setter = object.__setattr__
    for name, v in zip(names, get(obj), strict=True):
        setter(new, name, v.copy() if type(v) is list else v)
    return new


def copy_world(w: Any) -> Any:
    """``clone(w, {})``, about three times faster, for worlds of the shipped classes.

    The receiver, sender and allocator are copied by what their attributes are
    known to hold; a world whose objects carry other attributes (a patched or
    planted class) is handed to the generic :func:`clone`, never copied wrongly.
    """
    receiver, sender, allocator = w.receiver, w.sender, w.allocator
    rd, sd, ad = receiver.__dict__, sender.__dict__, allocator.__dict__
    if (
        rd.keys() != _RECEIVER_SHAPE
        or rd["sizer"] is not None
        or sd.keys() != _SENDER_SHAPE
        or ad.keys() - _ALLOCATOR_EXTRAS != _ALLOCATOR_SHAPE
    ):
        return clone(w, {})
    new = _new
    ledger = new(type(w.ledger))
    ledger.__dict__ = {k: v.copy() for k, v in w.ledger.__dict__.items()}
    al = new(type(allocator))
    d = al.__dict__ = ad.copy()
    free = _copy_slots(ad["_free"])
    d["_free"], d["_take"], d["_give"] = free, free.take, free.give
    d["_live"] = ad["_live"].copy()
    d["_by_owner"] = {k: v.copy() for k, v in ad["_by_owner"].items()}
    d["ledger"] = ledger
    buffers = new(type(w.buffers))
    d = buffers.__dict__ = w.buffers.__dict__.copy()
    d["allocator"], d["ledger"] = al, ledger
    transport = new(type(w.transport))
    d = transport.__dict__ = w.transport.__dict__.copy()
    d["buffers"], d["ledger"] = buffers, ledger
    rc = new(type(receiver))
    d = rc.__dict__ = rd.copy()
    d["buffers"], d["allocator"], d["transport"] = buffers, al, transport
    by_id = {id(r): _copy_slots(r) for r in rd["_records"].values()}
    d["_records"] = {k: by_id[id(r)] for k, r in rd["_records"].items()}
    d["_admissions"] = deque([by_id.get(id(r)) or _copy_slots(r) for r in rd["_admissions"]])
    d["_resumes"] = deque([by_id.get(id(r)) or _copy_slots(r) for r in rd["_resumes"]])
    d["_quarantine"] = rd["_quarantine"].copy()
    d["_finished"] = rd["_finished"].copy()
    se = new(type(sender))
    d = se.__dict__ = sd.copy()
    d["transport"] = transport
    d["_lives"] = {k: list(map(_copy_slots, v)) for k, v in sd["_lives"].items()}
    d["_parked"] = {k: v.copy() for k, v in sd["_parked"].items()}
    d["_cancelled"] = sd["_cancelled"].copy()
    d["_ended"] = sd["_ended"].copy()
    world = new(type(w))
    d = world.__dict__ = w.__dict__.copy()
    d["receiver"], d["sender"], d["allocator"] = rc, se, al
    d["buffers"], d["transport"], d["ledger"] = buffers, transport, ledger
    return world


__all__ = [
    "PRESSURE",
    "CellBuffers",
    "CheckedAllocator",
    "ExplorerTransport",
    "Ledger",
    "Span",
    "TokenSource",
    "clone",
    "copy_world",
    "share_as_immutable",
]
