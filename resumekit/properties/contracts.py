"""The contract every public entry point of the allocator, receiver and sender keeps: a
bad value gets a typed :class:`~resumekit.errors.ResumeKitError` that names it, and changes
nothing; a good one is accepted. ``resumekit verify`` checks every case
(:func:`check_contracts`), as the explorer and the fuzzer check the protocol; the unit
tests run the same table, with the transports' cases beside it.

One file: the cases, the world they run in and the checker that judges them are one
table; split, a case would name helpers two modules away.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import torch

from resumekit.allocator.block_allocator import _HOST_BYTES_PER_BLOCK, Allocation, BlockAllocator
from resumekit.allocator.buffers import BlockBuffers, EmbeddingTensors
from resumekit.errors import (
    CapacityExceededError,
    DoubleFreeError,
    DuplicateRequestError,
    ForeignAllocationError,
    InvalidArgumentError,
    InvariantError,
    LeakError,
    RequestNotFinishedError,
    ResumeKitError,
    TransportError,
    UnknownRequestError,
    UseAfterFreeError,
)
from resumekit.properties.draws import forged_tensors
from resumekit.protocol.declaration import TransferState
from resumekit.protocol.messages import NO_EPOCH, Landed, RoundPost, SenderError
from resumekit.protocol.policy import SchedulingPolicy
from resumekit.protocol.receiver import (
    ENV_DEFAULT_ALLOCATE_TOKENS,
    ReceiverObserver,
    ResumableReceiver,
)
from resumekit.protocol.sender import EmbeddingSender
from resumekit.transports.inprocess import InProcessTransport

HIDDEN: Final = 8
# The cases call with values of the wrong type on purpose: untyped handles keep them honest.
_A: Any = BlockAllocator
_R: Any = ResumableReceiver
_S: Any = EmbeddingSender


def source(n: int, *, seed: int = 0) -> EmbeddingTensors:
    """A source of ``n`` tokens of random bf16 embeddings."""
    g = torch.Generator().manual_seed(seed)
    return EmbeddingTensors(
        torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16),
        torch.arange(n, dtype=torch.int32),
        torch.arange(3 * n, dtype=torch.int32).view(3, n),
    )


@dataclass
class ContractWorld:
    """A receiver and sender mid-flight: one request finished, one with round 0 posted."""

    allocator: BlockAllocator
    buffers: BlockBuffers
    transport: InProcessTransport
    receiver: ResumableReceiver
    sender: EmbeddingSender
    held: Allocation
    freed: Allocation
    foreign: Allocation
    post: RoundPost

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a refused call must leave as it was, as values."""
        t = self.transport
        return (
            self.allocator.snapshot(),
            self.receiver.snapshot(),
            self.sender.snapshot(),
            (tuple(t.posts), tuple(t.in_flight), t.posted, t.delivered, t.sender_alive),
        )

    def tensors(self) -> list[torch.Tensor]:
        b = self.buffers
        return [x.clone() for x in (b.embeddings, b.fill_ids, b.mrope, b.aux)]


def make_world() -> ContractWorld:
    allocator = BlockAllocator(32, 4)
    buffers = BlockBuffers(allocator, HIDDEN, device="cpu")
    transport = InProcessTransport(buffers)
    receiver = ResumableReceiver(buffers, transport, 16)
    sender = EmbeddingSender(transport)
    receiver.add("done")
    sender.add("done", source(12, seed=1))
    for _ in range(4):
        sender.step()
        receiver.step()
    receiver.add("busy")  # round 0 posted, its source not yet added
    receiver.step()
    post, held = transport.posts[0], allocator.allocate(4, "engine")
    freed = allocator.allocate(4, "engine")
    foreign = BlockAllocator(4, 4).allocate(4, "elsewhere")
    if (
        receiver.poll("done") is not TransferState.Success
        or not isinstance(post, RoundPost)
        or held is None
        or freed is None
        or foreign is None
    ):
        raise AssertionError("the contract world did not come out as built")
    allocator.free(freed)
    return ContractWorld(
        allocator, buffers, transport, receiver, sender, held, freed, foreign, post
    )


class Forged:
    """Quacks like nothing resumekit knows."""


def relabelled(allocation: Allocation, generation: object) -> Allocation:
    """A copy of ``allocation`` (freed or not, as it is) under another generation: what a
    caller that copies allocations and edits them could hand back."""
    forged = copy.copy(allocation)
    forged._generation = generation  # type: ignore[assignment]  # a forgery holds anything
    return forged


def good_args(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = source(n)
    return src.embeddings, src.fill_ids, src.mrope


#: (name, the call, the error it must raise, the word its message must hold)
Case = tuple[str, Callable[[Any], object], type[BaseException], str]
E = InvalidArgumentError
EMB, FILL, MROPE = good_args(4)

ALLOCATOR: list[Case] = [
    ("BlockAllocator num_blocks 0", lambda w: _A(0, 4), E, "num_blocks"),
    ("BlockAllocator num_blocks -1", lambda w: _A(-1, 4), E, "num_blocks"),
    (
        "BlockAllocator num_blocks 2**62",
        lambda w: _A(2**62, 64),
        CapacityExceededError,
        "num_blocks",
    ),
    (
        "BlockAllocator num_blocks 10**30",
        lambda w: _A(10**30, 64),
        CapacityExceededError,
        f"{10**30 * _HOST_BYTES_PER_BLOCK:,} bytes",  # what the free list would take
    ),
    ("BlockAllocator num_blocks float", lambda w: _A(4.0, 4), E, "num_blocks"),
    ("BlockAllocator num_blocks str", lambda w: _A("4", 4), E, "num_blocks"),
    ("BlockAllocator num_blocks bool", lambda w: _A(True, 4), E, "num_blocks"),
    ("BlockAllocator num_blocks None", lambda w: _A(None, 4), E, "num_blocks"),
    ("BlockAllocator block_size 0", lambda w: _A(4, 0), E, "block_size"),
    ("BlockAllocator block_size 2**31", lambda w: _A(4, 2**31), E, "block_size"),
    ("BlockAllocator block_size 10**30", lambda w: _A(4, 10**30), E, "block_size"),
    ("BlockAllocator block_size float", lambda w: _A(4, 4.5), E, "block_size"),
    ("BlockAllocator reuse LIFO", lambda w: _A(4, 4, reuse="LIFO"), E, "reuse"),
    ("BlockAllocator reuse None", lambda w: _A(4, 4, reuse=None), E, "reuse"),
    ("BlockAllocator reuse list", lambda w: _A(4, 4, reuse=[]), E, "reuse"),
    ("allocate 0 tokens", lambda w: w.allocator.allocate(0, "o"), E, "num_tokens"),
    ("allocate -3 tokens", lambda w: w.allocator.allocate(-3, "o"), E, "num_tokens"),
    ("allocate float tokens", lambda w: w.allocator.allocate(1.5, "o"), E, "num_tokens"),
    ("allocate str tokens", lambda w: w.allocator.allocate("8", "o"), E, "num_tokens"),
    ("allocate None tokens", lambda w: w.allocator.allocate(None, "o"), E, "num_tokens"),
    ("allocate bool tokens", lambda w: w.allocator.allocate(True, "o"), E, "num_tokens"),
    (
        "allocate more than the pool",
        lambda w: w.allocator.allocate(10**9, "o"),
        CapacityExceededError,
        "num_tokens",
    ),
    ("allocate list owner", lambda w: w.allocator.allocate(4, []), E, "owner"),
    ("allocate dict owner", lambda w: w.allocator.allocate(4, {}), E, "owner"),
    ("allocate list owner, named", lambda w: w.allocator.allocate(4, []), E, "list"),
    (
        "allocate list owner when full",  # every block: more than are free, never too many
        lambda w: w.allocator.allocate(w.allocator.num_blocks * 4, []),
        E,
        "owner",
    ),
    ("allocate_up_to 0 tokens", lambda w: w.allocator.allocate_up_to(0, "o"), E, "num_tokens"),
    (  # the first bad argument is the one named
        "allocate_up_to 0 tokens, min 0",
        lambda w: w.allocator.allocate_up_to(0, "o", 0),
        E,
        "num_tokens",
    ),
    ("allocate_up_to min 0", lambda w: w.allocator.allocate_up_to(4, "o", 0), E, "min_tokens"),
    ("allocate_up_to min > num", lambda w: w.allocator.allocate_up_to(4, "o", 8), E, "min_tokens"),
    ("allocate_up_to min str", lambda w: w.allocator.allocate_up_to(4, "o", "1"), E, "min_tokens"),
    (
        "allocate_up_to min beyond the pool",
        lambda w: w.allocator.allocate_up_to(10**9, "o", 10**9),
        CapacityExceededError,
        "min_tokens",
    ),
    ("allocate_up_to list owner", lambda w: w.allocator.allocate_up_to(4, []), E, "owner"),
    ("free None", lambda w: w.allocator.free(None), E, "allocation"),
    ("free object", lambda w: w.allocator.free(Forged()), E, "allocation"),
    ("free str", lambda w: w.allocator.free("blocks"), E, "allocation"),
    ("free str, named", lambda w: w.allocator.free("blocks"), E, "str"),
    ("free twice", lambda w: w.allocator.free(w.freed), DoubleFreeError, "allocation"),
    ("free foreign", lambda w: w.allocator.free(w.foreign), ForeignAllocationError, "allocation"),
    (  # and says why: another allocator issued it
        "free foreign, why",
        lambda w: w.allocator.free(w.foreign),
        ForeignAllocationError,
        "issued",
    ),
    (
        "free a copy",
        lambda w: w.allocator.free(
            Allocation(w.held.blocks, w.held.capacity_tokens, w.held.owner, w.held.generation)
        ),
        ForeignAllocationError,
        "allocation",
    ),
    (
        "free a freed copy under a live generation",
        lambda w: w.allocator.free(relabelled(w.freed, w.held.generation)),
        ForeignAllocationError,
        "allocation",
    ),
    (
        "free a freed copy under a generation never issued",
        lambda w: w.allocator.free(relabelled(w.freed, 10**6)),
        ForeignAllocationError,
        "allocation",
    ),
    (
        "free a copy with a str generation",
        lambda w: w.allocator.free(relabelled(w.freed, "1")),
        ForeignAllocationError,
        "generation",
    ),
    ("free_owner list", lambda w: w.allocator.free_owner([]), E, "owner"),
    ("outstanding_of list", lambda w: w.allocator.outstanding_of([]), E, "owner"),
    ("is_live None", lambda w: w.allocator.is_live(None), E, "allocation"),
    ("is_live str", lambda w: w.allocator.is_live("x"), E, "allocation"),
    ("check_live None", lambda w: w.allocator.check_live(None), E, "allocation"),
    (
        "check_live freed",
        lambda w: w.allocator.check_live(w.freed),
        UseAfterFreeError,
        "allocation",
    ),
    ("blocks_for -1", lambda w: w.allocator.blocks_for(-1), E, "num_tokens"),
    ("blocks_for str", lambda w: w.allocator.blocks_for("1"), E, "num_tokens"),
    ("blocks_for float", lambda w: w.allocator.blocks_for(1.0), E, "num_tokens"),
]


class _StrIds(InProcessTransport):
    """A transport that carries only str ids (as a wire format might)."""

    def check_request_id(self, rid: Any) -> None:
        if type(rid) is not str:
            raise InvalidArgumentError(f"rid must be a str on this transport, not {rid!r}")


def _narrow_add(w: ContractWorld) -> object:
    receiver = ResumableReceiver(w.buffers, _StrIds(w.buffers), 16)
    return receiver.add(7)


def _narrow_add_accepts(w: ContractWorld) -> bool:
    """The transport judges the id the engine passed: one it carries is added."""
    receiver = ResumableReceiver(w.buffers, _StrIds(w.buffers), 16)
    receiver.add("seven")
    return "seven" in receiver


def _huge_source(w: ContractWorld) -> object:
    """A source of 2**31 tokens, as stride-0 views: one token more than int32 counts."""
    n = 2**31
    emb = torch.zeros(1, HIDDEN, dtype=torch.bfloat16).expand(n, HIDDEN)
    fill = torch.zeros(1, dtype=torch.int32).expand(n)
    mrope = torch.zeros(3, 1, dtype=torch.int32).expand(3, n)
    return w.sender.add("huge", EmbeddingTensors(emb, fill, mrope))


def _narrow_sender_add(w: ContractWorld) -> object:
    return EmbeddingSender(_StrIds(w.buffers)).add(7, source(4, seed=3))


def _narrow_sender_add_accepts(w: ContractWorld) -> bool:
    """The sender's transport judges the id the encoder passed, too."""
    sender = EmbeddingSender(_StrIds(w.buffers))
    return sender.add("seven", source(4, seed=3)) is True


def _sizing_swapped(w: ContractWorld) -> None:
    auto = ResumableReceiver(w.buffers, w.transport, "auto")
    auto.restore(w.receiver.snapshot())


class _NoAllocator:
    """Reads and makes outputs like buffers, but has no allocator to size rounds by."""

    def new_output(self, *args: object) -> None: ...
    def read_into(self, *args: object) -> None: ...
    def read_aux(self, *args: object) -> None: ...


RECEIVER: list[Case] = [
    (
        "ResumableReceiver buffers None",
        lambda w: _R(None, w.transport),
        E,
        "buffers",
    ),
    ("ResumableReceiver buffers str", lambda w: _R("b", w.transport), E, "buffers"),
    (
        "ResumableReceiver buffers without an allocator",
        lambda w: _R(_NoAllocator(), w.transport),
        E,
        "buffers",
    ),
    (
        "ResumableReceiver buffers allocator",
        lambda w: _R(w.allocator, w.transport),
        E,
        "buffers",
    ),
    (
        "ResumableReceiver transport None",
        lambda w: _R(w.buffers, None),
        E,
        "transport",
    ),
    (
        "ResumableReceiver transport object",
        lambda w: _R(w.buffers, Forged()),
        E,
        "transport",
    ),
    (
        "ResumableReceiver default 0",
        lambda w: _R(w.buffers, w.transport, 0),
        E,
        "default_allocate_tokens",
    ),
    (
        "ResumableReceiver default -5",
        lambda w: _R(w.buffers, w.transport, -5),
        E,
        "default_allocate_tokens",
    ),
    (
        "ResumableReceiver default str",
        lambda w: _R(w.buffers, w.transport, "16"),
        E,
        "default_allocate_tokens",
    ),
    (
        "ResumableReceiver default float",
        lambda w: _R(w.buffers, w.transport, 8.5),
        E,
        "default_allocate_tokens",
    ),
    (
        "ResumableReceiver default beyond the pool",
        lambda w: _R(w.buffers, w.transport, 10**6),
        E,
        "default_allocate_tokens",
    ),
    (
        "ResumableReceiver max_resume_tokens 0",
        lambda w: _R(w.buffers, w.transport, 16, max_resume_tokens=0),
        E,
        "max_resume_tokens",
    ),
    (
        "ResumableReceiver max_resume_tokens str",
        lambda w: _R(w.buffers, w.transport, 16, max_resume_tokens="8"),
        E,
        "max_resume_tokens",
    ),
    (
        "ResumableReceiver observer int",
        lambda w: _R(w.buffers, w.transport, 16, observer=3),
        E,
        "observer",
    ),
    (  # the message names what the observer must be, too
        "ResumableReceiver observer object names the interface",
        lambda w: _R(w.buffers, w.transport, 16, observer=object()),
        E,
        "ReceiverObserver",
    ),
    ("add list", lambda w: w.receiver.add([]), E, "rid"),
    ("add an id the transport cannot carry", _narrow_add, E, "rid"),
    ("sender add an id the transport cannot carry", _narrow_sender_add, E, "rid"),
    ("sender add a source of 2**31 tokens", _huge_source, E, "source"),
    ("add dict", lambda w: w.receiver.add({}), E, "rid"),
    ("add a known id", lambda w: w.receiver.add("busy"), DuplicateRequestError, "busy"),
    ("add a finished id", lambda w: w.receiver.add("done"), DuplicateRequestError, "done"),
    ("add bootstrapped str", lambda w: w.receiver.add("n", bootstrapped="no"), E, "bootstrapped"),
    ("add bootstrapped 1", lambda w: w.receiver.add("n", bootstrapped=1), E, "bootstrapped"),
    ("add size_hint list", lambda w: w.receiver.add("n", size_hint=[]), E, "size_hint"),
    ("poll unknown", lambda w: w.receiver.poll("nope"), UnknownRequestError, "nope"),
    ("poll list", lambda w: w.receiver.poll([]), UnknownRequestError, "[]: rid"),
    ("abort unknown", lambda w: w.receiver.abort("nope"), UnknownRequestError, "nope"),
    ("abort list", lambda w: w.receiver.abort([]), UnknownRequestError, "[]: rid"),
    ("abort reason int", lambda w: w.receiver.abort("busy", reason=5), E, "reason"),
    ("abort reason None", lambda w: w.receiver.abort("busy", reason=None), E, "reason"),
    ("take unknown", lambda w: w.receiver.take("nope"), UnknownRequestError, "nope"),
    ("take list", lambda w: w.receiver.take([]), UnknownRequestError, "[]: rid"),
    ("take in flight", lambda w: w.receiver.take("busy"), RequestNotFinishedError, "busy"),
    ("record unknown", lambda w: w.receiver.record("nope"), UnknownRequestError, "nope"),
    (
        "bootstrapped unknown",
        lambda w: w.receiver.bootstrapped("nope"),
        UnknownRequestError,
        "nope",
    ),
    ("bootstrapped twice", lambda w: w.receiver.bootstrapped("busy"), E, "busy"),
    ("bootstrapped finished", lambda w: w.receiver.bootstrapped("done"), E, "done"),
]


SENDER: list[Case] = [
    ("EmbeddingSender transport None", lambda w: _S(None), E, "transport"),
    ("EmbeddingSender transport object", lambda w: _S(Forged()), E, "transport"),
    (
        "EmbeddingSender transport is the buffers",
        lambda w: _S(w.buffers),
        E,
        "transport",
    ),
    (
        "EmbeddingSender max_tombstones -1",
        lambda w: _S(w.transport, max_tombstones=-1),
        E,
        "max_tombstones",
    ),
    (
        "EmbeddingSender max_tombstones str",
        lambda w: _S(w.transport, max_tombstones="5"),
        E,
        "max_tombstones",
    ),
    ("sender add list rid", lambda w: w.sender.add([], source(4)), E, "rid"),
    ("sender add None source", lambda w: w.sender.add("busy", None), E, "source"),
    ("sender add tuple source", lambda w: w.sender.add("busy", (EMB, FILL, MROPE)), E, "source"),
    (
        "sender add forged transposed mrope",
        lambda w: w.sender.add("busy", forged_tensors(EMB, FILL, MROPE.t())),
        E,
        "source",
    ),
    (
        "sender add int embeddings",
        lambda w: w.sender.add("busy", forged_tensors(EMB.to(torch.int32), FILL, MROPE)),
        E,
        "embeddings",
    ),
    (
        "sender add forged int64 fill",
        lambda w: w.sender.add("busy", forged_tensors(EMB, FILL.long(), MROPE)),
        E,
        "source",
    ),
    (
        "sender add forged lists",
        lambda w: w.sender.add("busy", forged_tensors([1.0], [1], [[1], [2], [3]])),
        E,
        "source",
    ),
    (
        "sender add requires grad",
        lambda w: w.sender.add("busy", EmbeddingTensors(EMB.float().requires_grad_(), FILL, MROPE)),
        E,
        "source",
    ),
    ("sender add empty source", lambda w: w.sender.add("busy", source(0)), E, "source"),
    (
        "sender add fields on two devices",
        lambda w: w.sender.add("busy", forged_tensors(EMB.to("meta"), FILL, MROPE)),
        E,
        "source",
    ),
    (
        "sender add mrope_delta 2**31",
        lambda w: w.sender.add("busy", source(4), mrope_delta=2**31),
        E,
        "mrope_delta",
    ),
    (
        "sender add mrope_delta str",
        lambda w: w.sender.add("busy", source(4), mrope_delta="1"),
        E,
        "mrope_delta",
    ),
    (
        "sender add mrope_delta float",
        lambda w: w.sender.add("busy", source(4), mrope_delta=1.5),
        E,
        "mrope_delta",
    ),
    (
        "sender add incarnation 0",
        lambda w: w.sender.add("busy", source(4), incarnation=0),
        E,
        "incarnation",
    ),
    (
        "sender add incarnation str",
        lambda w: w.sender.add("busy", source(4), incarnation="2"),
        E,
        "incarnation",
    ),
    (
        "sender add incarnation bool",
        lambda w: w.sender.add("busy", source(4), incarnation=True),
        E,
        "incarnation",
    ),
]


def _bad_record(w: ContractWorld) -> Any:
    """The receiver's snapshot with a record whose state is a name, not a TransferState."""
    snap: Any = w.receiver.snapshot()
    return snap._replace(records=(snap.records[0]._replace(state="Success"), *snap.records[1:]))


def _record_twice(w: ContractWorld) -> Any:
    snap: Any = w.receiver.snapshot()
    return snap._replace(records=(snap.records[0], *snap.records))


def _record_holding_freed(w: ContractWorld) -> Any:
    """A record naming an allocation its allocator freed."""
    snap: Any = w.receiver.snapshot()
    busy = next(r for r in snap.records if r.allocation is not None)
    rest = tuple(r for r in snap.records if r is not busy)
    return snap._replace(records=(*rest, busy._replace(allocation=w.freed)))


def _block_twice(w: ContractWorld) -> Any:
    """The allocator's snapshot with one free block listed twice, another not at all."""
    snap: Any = w.allocator.snapshot()
    return snap._replace(free=(snap.free[0], *snap.free[:-1]))


def _live_reversed(w: ContractWorld) -> Any:
    snap: Any = w.allocator.snapshot()
    return snap._replace(live=tuple(reversed(snap.live)))


SNAPSHOTS: list[Case] = [
    (
        "receiver check_quiescent with requests held",
        lambda w: w.receiver.check_quiescent(),
        LeakError,
        "not taken",
    ),
    (
        "allocator check_quiescent with blocks held",
        lambda w: w.allocator.check_quiescent(),
        LeakError,
        "leaked",
    ),
    ("receiver restore None", lambda w: w.receiver.restore(None), E, "snapshot"),
    ("receiver restore str", lambda w: w.receiver.restore("s"), E, "str"),
    ("receiver restore a fixed round 0 into auto", _sizing_swapped, E, "sizing"),
    (
        "receiver restore a record of no state",
        lambda w: w.receiver.restore(_bad_record(w)),
        E,
        "snapshot",
    ),
    ("sender restore None", lambda w: w.sender.restore(None), E, "snapshot"),
    (
        "sender restore ended lives not ints",
        lambda w: w.sender.restore(w.sender.snapshot()._replace(ended=(("done", "1"),))),
        E,
        "ended",
    ),
    (
        "sender restore cancelled lives not ints",
        lambda w: w.sender.restore(w.sender.snapshot()._replace(cancelled=(("x", ("1",)),))),
        E,
        "cancelled",
    ),
    (  # what may be parked, named (a mutant refused it with no message)
        "sender restore parks a non-post",
        lambda w: w.sender.restore(w.sender.snapshot()._replace(parked=(("x", ("post",)),))),
        E,
        "RoundPost",
    ),
    (  # the message names what the transport must be, too
        "EmbeddingSender transport object names the interface",
        lambda w: EmbeddingSender(object()),  # type: ignore[arg-type]
        E,
        "SenderTransport",
    ),
    (
        "receiver restore a request twice",
        lambda w: w.receiver.restore(_record_twice(w)),
        E,
        "twice",
    ),
    (
        "receiver restore a round in freed blocks",
        lambda w: w.receiver.restore(_record_holding_freed(w)),
        E,
        "not live",
    ),
    (
        "sender restore a source that is not one",
        lambda w: w.sender.restore(w.sender.snapshot()._replace(lives=(("x", ("src",)),))),
        E,
        "SourceState",
    ),
    ("allocator restore None", lambda w: w.allocator.restore(None), E, "snapshot"),
    (
        "allocator restore a non-allocation",
        lambda w: w.allocator.restore(w.allocator.snapshot()._replace(live=("a",))),
        E,
        "not an allocation of this pool",
    ),
    (
        "allocator restore live allocations out of order",
        lambda w: w.allocator.restore(_live_reversed(w)),
        E,
        "generation order",
    ),
    (
        "allocator restore a block twice",
        lambda w: w.allocator.restore(_block_twice(w)),
        E,
        "exactly once",
    ),
    (
        "allocator restore another allocator's snapshot",
        lambda w: w.allocator.restore(BlockAllocator(32, 4).snapshot()),
        E,
        "snapshot",
    ),
]

CASES: Final = ALLOCATOR + RECEIVER + SENDER + SNAPSHOTS


def _invariants_hold(w: ContractWorld) -> bool:
    w.allocator.check_invariants()
    return True


def _policy_defaults(w: ContractWorld) -> bool:
    """A policy's bulk rounds default to an eighth of the pool, in whole blocks (16 tokens)."""
    receiver = ResumableReceiver(w.buffers, w.transport, 16, policy=SchedulingPolicy())
    return receiver.policy is not None and receiver.policy.bulk_round_tokens == 16


def _auto_learns(w: ContractWorld) -> bool:
    """With ``"auto"``, round 0 shrinks from the whole pool once 20 requests of a hint
    showed 40 tokens each."""
    allocator = BlockAllocator(32, 4)
    transport = InProcessTransport(BlockBuffers(allocator, HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, "auto")
    sender = EmbeddingSender(transport)
    for n in range(21):
        receiver.add(n, size_hint="h")
        receiver.step()
        if n == 20:
            post = transport.posts[-1]
            return isinstance(post, RoundPost) and post.capacity_tokens < 128
        sender.add(n, source(40))
        for _ in range(8):
            sender.step()
            receiver.step()
        if not receiver.take(n).ok:
            return False
    return False


def _env_default(w: ContractWorld) -> bool:
    """The environment's default round is used, and a bad one is refused naming the
    variable, not a word, an integer below one included."""
    old = os.environ.get(ENV_DEFAULT_ALLOCATE_TOKENS)
    os.environ[ENV_DEFAULT_ALLOCATE_TOKENS] = "12"
    try:
        if ResumableReceiver(w.buffers, w.transport).default_allocate_tokens != 12:
            return False
        for bad in ("twelve", "0"):
            os.environ[ENV_DEFAULT_ALLOCATE_TOKENS] = bad
            try:
                ResumableReceiver(w.buffers, w.transport)
            except InvalidArgumentError as error:
                if ENV_DEFAULT_ALLOCATE_TOKENS not in str(error):
                    return False
            else:
                return False
        return True
    finally:
        if old is None:
            del os.environ[ENV_DEFAULT_ALLOCATE_TOKENS]
        else:
            os.environ[ENV_DEFAULT_ALLOCATE_TOKENS] = old


def _tombstones_kept(w: ContractWorld) -> bool:
    """A sender with ``max_tombstones=2`` keeps the last two lives of an id cancelled before
    its source came, and no more."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    sender = EmbeddingSender(transport, max_tombstones=2)
    for life in (1, 2, 3):
        transport.cancel("late", NO_EPOCH, incarnation=life)
        sender.step()
    return sender.snapshot().cancelled == (("late", (2, 3)),)


def _membership(w: ContractWorld) -> bool:
    """``in`` and ``len`` on the receiver and the sender: known ids, an id the sender holds
    only a parked post of, one it holds only a source of, and ids they do not know."""
    w.sender.step()  # parks the round 0 of "busy": its source is not there yet
    w.sender.add("source only", source(4))
    receiver, sender = w.receiver, w.sender
    return (
        len(receiver) == 2
        and len(sender) == 1
        and "busy" in receiver
        and "done" in receiver
        and "nope" not in receiver
        and [] not in receiver
        and "busy" in sender
        and "source only" in sender
        and "nope" not in sender
        and [] not in sender
    )


def _bootstrapped(w: ContractWorld) -> bool:
    """A request added before its peer is known waits in Bootstrapping; ``bootstrapped``
    lets the next step admit it."""
    w.receiver.add("late peer", bootstrapped=False)
    w.receiver.step()
    waited = w.receiver.poll("late peer") is TransferState.Bootstrapping
    w.receiver.bootstrapped("late peer")
    w.receiver.step()
    return waited and w.receiver.poll("late peer") is TransferState.Transferring


def _sender_leak_named(w: ContractWorld) -> bool:
    """``check_quiescent`` on a sender still holding a source raises, naming the id."""
    w.sender.add("held", source(4))
    try:
        w.sender.check_quiescent()
    except LeakError as error:
        return "held" in str(error)
    return False


class _Heard(ReceiverObserver):
    def __init__(self) -> None:
        self.consumed: list[tuple[object, int, int]] = []
        self.events: list[str] = []

    def round_posted(self, post: RoundPost) -> None:
        self.events.append(f"posted {post.epoch}")

    def round_consumed(self, rid: Any, epoch: int, tokens: int, allocation: Allocation) -> None:
        self.consumed.append((rid, epoch, tokens))
        self.events.append(f"consumed {epoch}")

    def request_failed(self, rid: Any, reason: str) -> None:
        self.events.append(f"failed {rid}: {reason}")


def _observer_hears(w: ContractWorld) -> bool:
    """An observer hears each round consumed, with its epoch and tokens, in order."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    heard = _Heard()
    receiver = ResumableReceiver(transport.buffers, transport, 4, observer=heard)
    sender = EmbeddingSender(transport)
    receiver.add("r")
    sender.add("r", source(10))
    for _ in range(8):
        receiver.step()
        sender.step()
    return receiver.take("r").ok and heard.consumed == [("r", 0, 4), ("r", 1, 6)]


def _early_post_overlaps(w: ContractWorld) -> bool:
    """With exactly the blocks the next round needs free, it is posted before the landed
    round is copied out, so the sender fills it meanwhile."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(3, 4), HIDDEN, device="cpu"))
    heard = _Heard()
    receiver = ResumableReceiver(transport.buffers, transport, 4, observer=heard)
    sender = EmbeddingSender(transport)
    receiver.add("r")
    sender.add("r", source(12))
    for _ in range(6):
        receiver.step()
        sender.step()
    expect = ["posted 0", "posted 1", "consumed 0", "consumed 1"]
    return receiver.take("r").ok and heard.events == expect


def _observer_hears_failure(w: ContractWorld) -> bool:
    """An observer hears a request fail, with its id and the abort's reason."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    heard = _Heard()
    receiver = ResumableReceiver(transport.buffers, transport, 4, observer=heard)
    receiver.add("r")
    receiver.step()
    receiver.abort("r", reason="user left")
    return heard.events == ["posted 0", "failed r: user left"]


def _early_post_whole(w: ContractWorld) -> bool:
    """With fewer blocks free than the next round needs, nothing is posted early, and the
    round posted once the landed one is freed is whole: an early post never shrinks it."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(3, 4), HIDDEN, device="cpu"))
    heard = _Heard()
    receiver = ResumableReceiver(transport.buffers, transport, 4, observer=heard)
    sender = EmbeddingSender(transport)
    receiver.add("r")
    sender.add("r", source(16))
    for _ in range(6):
        receiver.step()
        sender.step()
    expect = ["posted 0", "consumed 0", "posted 1", "consumed 1"]
    return receiver.take("r").ok and heard.events == expect


def _sender_error_reason_kept(w: ContractWorld) -> bool:
    """A sender's refusal of the round in flight fails the request with the sender's reason."""
    w.transport.report(SenderError("busy", 0, "disk on fire", incarnation=w.post.incarnation))
    w.receiver.step()
    record = w.receiver.take("busy")
    return not record.ok and "disk on fire" in (record.reason or "")


def _unexpected_round_named(w: ContractWorld) -> bool:
    """A status for a round never posted fails the request, naming the round in flight."""
    w.transport.report(Landed("busy", 2, 1, 12, False, incarnation=w.post.incarnation))
    w.receiver.step()
    record = w.receiver.take("busy")
    return not record.ok and "the round in flight is 0" in (record.reason or "")


def _copy_out_failure_fails_request(w: ContractWorld) -> bool:
    """A copy-out that fails (the transport lost the round's bytes) fails that request
    with the error in its reason, frees its blocks and leaves the step to go on."""
    allocator = BlockAllocator(8, 4)
    transport = InProcessTransport(BlockBuffers(allocator, HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 4)
    sender = EmbeddingSender(transport)

    def lost(*args: object) -> None:
        raise TransportError("the round's bytes are gone")

    receiver.add("r")
    sender.add("r", source(12))
    receiver.step()
    sender.step()
    transport.buffers.read_into = lost  # type: ignore[method-assign,assignment]
    receiver.step()
    record = receiver.take("r")
    for _ in range(2):  # the sender answers the cancel of a round posted early
        sender.step()
        receiver.step()
    reason = record.reason or ""
    return (
        not record.ok
        and "protocol error" in reason
        and "bytes are gone" in reason
        and allocator.num_free_blocks == allocator.num_blocks
    )


class _Index:
    """An int-like (numpy's ints quack so): sizes are read through ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _index_sized(w: ContractWorld) -> bool:
    """``allocate`` takes an int-like size, down to one token, as the int it stands for."""
    got = w.allocator.allocate(_Index(1), "engine")  # type: ignore[arg-type]
    if got is None or len(got.blocks) != 1:
        return False
    w.allocator.free(got)
    return True


def _missing_block_seen(w: ContractWorld) -> bool:
    """``check_invariants`` names a block that is neither free nor allocated."""
    allocator = BlockAllocator(4, 4)
    a = allocator.allocate(4, "o")
    assert a is not None
    del allocator._live[a.generation]  # bookkeeping corrupted by hand
    allocator._by_owner.pop("o")
    try:
        allocator.check_invariants()
    except InvariantError as error:
        return "neither free nor allocated" in str(error)
    return False


def _wrong_capacity_seen(w: ContractWorld) -> bool:
    """``check_invariants`` names an allocation whose capacity its blocks do not give."""
    allocator = BlockAllocator(4, 4)
    a = allocator.allocate(4, "o")
    assert a is not None
    a._capacity_tokens += 1  # bookkeeping corrupted by hand
    try:
        allocator.check_invariants()
    except InvariantError as error:
        return "wrong capacity" in str(error)
    return False


def _block_past_the_pool_seen(w: ContractWorld) -> bool:
    """``check_invariants`` names a free block one past the pool's last as out of range."""
    allocator = BlockAllocator(4, 4, reuse="lifo")
    a = allocator.allocate(4, "o")
    assert a is not None
    allocator.free(a)
    stack: list[int] = allocator._free._stack  # type: ignore[union-attr]
    stack[stack.index(a.blocks[0])] = 4  # bookkeeping corrupted by hand: block 4 of 0..3
    try:
        allocator.check_invariants()
    except InvariantError as error:
        return "out-of-range block 4" in str(error)
    return False


def _block_free_and_held_seen(w: ContractWorld) -> bool:
    """``check_invariants`` names a block both held and on the free list, and says free."""
    allocator = BlockAllocator(4, 4, reuse="lifo")
    a = allocator.allocate(4, "o")
    assert a is not None
    allocator._free._stack.append(a.blocks[0])  # type: ignore[union-attr]
    try:
        allocator.check_invariants()
    except InvariantError as error:
        return str(error).endswith(f"block {a.blocks[0]} is in generation 0 and also free")
    return False


def _restore_primes_snapshot(w: ContractWorld) -> bool:
    """After ``restore(s)`` the receiver's ``snapshot()`` is ``s`` itself until it changes
    (the explorer relies on it: an unchanged part is neither copied nor rebuilt)."""
    snap = w.receiver.snapshot()
    w.receiver.add("later")
    w.receiver.restore(snap)
    return w.receiver.snapshot() is snap and "later" not in w.receiver


def _sender_restore_primes_snapshot(w: ContractWorld) -> bool:
    """After ``restore(s)`` the sender holds ``s`` and its ``snapshot()`` is ``s`` itself
    (a restore that kept the state it had would leave the explorer exploring a sender
    that never goes back)."""
    snap = w.sender.snapshot()
    w.sender.add("later", source(2, seed=5))
    changed = w.sender.snapshot()
    w.sender.restore(snap)
    back = w.sender.snapshot() is snap and "later" not in w.sender
    w.sender.restore(changed)
    return back and "later" in w.sender and w.sender.snapshot() is changed


def _unissued_generation_seen(w: ContractWorld) -> bool:
    """``check_invariants`` sees a live generation the allocator never issued."""
    allocator = BlockAllocator(4, 4)
    a = allocator.allocate(4, "o")
    assert a is not None
    allocator._next_generation = a.generation  # bookkeeping corrupted by hand
    try:
        allocator.check_invariants()
    except InvariantError:
        return True
    return False


def _hints_kept_apart(w: ContractWorld) -> bool:
    """With ``"auto"``, each size hint learns its own round 0: 40-token requests of one
    hint and 100-token requests of another end up with different round 0s."""
    allocator = BlockAllocator(64, 4)
    transport = InProcessTransport(BlockBuffers(allocator, HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, "auto")
    sender = EmbeddingSender(transport)
    for n in range(40):
        hint, tokens = ("small", 40) if n % 2 else ("large", 100)
        receiver.add(n, size_hint=hint)
        sender.add(n, source(tokens))
        for _ in range(8):
            receiver.step()
            sender.step()
        if not receiver.take(n).ok:
            return False
    capacities = []
    for hint in ("small", "large"):
        receiver.add(hint, size_hint=hint)
        receiver.step()
        post = transport.posts[-1]
        if not isinstance(post, RoundPost):
            return False
        capacities.append(post.capacity_tokens)
    return capacities[0] < capacities[1]


def _ended_bounded(w: ContractWorld) -> bool:
    """A sender with ``max_tombstones=2`` remembers the ended lives of the last two ids."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    sender = EmbeddingSender(transport, max_tombstones=2)
    for rid in ("a", "b", "c"):
        transport.cancel(rid, NO_EPOCH, incarnation=1)
        sender.step()
    return sender.snapshot().ended == (("b", 1), ("c", 1))


def _late_source_of_another_life(w: ContractWorld) -> bool:
    """A named source of an ended life holding no tombstone is dropped, and the other lives'
    tombstones stay."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    sender = EmbeddingSender(transport, max_tombstones=2)
    for life in (1, 2, 3):
        transport.cancel("late", NO_EPOCH, incarnation=life)
        sender.step()
    kept = sender.add("late", source(4), incarnation=1) is False
    return kept and sender.snapshot().cancelled == (("late", (2, 3)),)


def _older_life_ended_by_a_newer(w: ContractWorld) -> bool:
    """A post of a newer life of an id ends its older lives at the sender though their
    Cancel never came (lost with the link): their sources go, the id's ended life is it."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 4)
    sender = EmbeddingSender(transport)
    first = receiver.add("x")
    sender.add("x", source(8), incarnation=first)
    receiver.step()
    sender.step()  # round 0 of the first life: 4 of its 8 tokens
    receiver.abort("x")
    transport.posts.clear()  # its Cancel is lost
    receiver.step()
    receiver.take("x")
    second = receiver.add("x")
    sender.add("x", source(8, seed=3), incarnation=second)
    receiver.step()
    sender.step()  # round 0 of the second life
    lives = dict(sender.snapshot().lives)
    held = [s.incarnation for s in lives.get("x", ())]
    return held == [second] and sender.snapshot().ended == (("x", first),)


def _reuse_orders(w: ContractWorld) -> bool:
    """``lifo`` gives a freed allocation's blocks back first, in the same order, and a
    fresh pool its highest blocks first; ``fifo`` the blocks free the longest first."""
    got = []
    for reuse in ("lifo", "fifo"):
        allocator = BlockAllocator(8, 4, reuse=reuse)
        a = allocator.allocate(12, "o")
        assert a is not None
        allocator.free(a)
        b = allocator.allocate(12, "o")
        assert b is not None
        got.append((a.blocks, b.blocks))
    return got == [((5, 6, 7), (5, 6, 7)), ((0, 1, 2), (3, 4, 5))]


def _repeated_post_ignored(w: ContractWorld) -> bool:
    """A post of a round already served (a channel that delivers twice) is counted as a
    repeat and changes nothing else: no write, no status, the next round still owed."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 4)
    sender = EmbeddingSender(transport)
    sender.add("x", source(8), incarnation=receiver.add("x"))
    receiver.step()
    post = transport.posts[0]
    sender.step()
    before, reported = sender.snapshot(), len(transport.in_flight)
    transport.posts.extend((post, post))
    wrote = sender.step()
    after = sender.snapshot()
    counts = (after.rounds_served, after.repeated_posts, after.stale_posts)
    same = after.lives == before.lives and len(transport.in_flight) == reported
    return wrote == 0 and same and counts == (before.rounds_served, 2, before.stale_posts)


def _free_owner_frees_all(w: ContractWorld) -> bool:
    """``free_owner`` frees every live allocation of the owner, however many."""
    allocator = BlockAllocator(8, 4)
    for tokens in (4, 8, 4):
        allocator.allocate(tokens, "o")
    allocator.allocate(4, "other")
    freed = allocator.free_owner("o")
    return freed == 3 and allocator.num_free_blocks == 7 and allocator.outstanding_of("o") == ()


def _fresh_counts(w: ContractWorld) -> bool:
    """A fresh receiver and sender have counted nothing (verify judges counts by change)."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 4)
    sender = EmbeddingSender(transport)
    r, s = receiver.snapshot(), sender.snapshot()
    counts = (r.stale_statuses, r.orphan_statuses, r.malformed_statuses, r.next_incarnation)
    sent = (s.rounds_served, s.repeated_posts, s.stale_posts, s.malformed_posts)
    return counts == (0, 0, 0, 1) and sent == (0, 0, 0, 0) and r.peer_lost is None


def _self_check_names_each_corruption(w: ContractWorld) -> bool:
    """``check_invariants`` raises, naming what is wrong, for each way its bookkeeping can
    be corrupted (by hand here; by a bug in the field)."""

    def corrupt(how: Callable[[Any, Any, Any], None]) -> str:
        allocator: Any = BlockAllocator(8, 4)
        a, b = allocator.allocate(4, "o"), allocator.allocate(8, "p")
        how(allocator, a, b)
        try:
            allocator.check_invariants()
        except InvariantError as error:
            return str(error)
        return "nothing raised"

    def put(obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)

    def lose_one(al: Any, a: Any, b: Any) -> None:
        al._free._stack.pop()
        al._num_free -= 1

    cases: list[tuple[Callable[[Any, Any, Any], None], str]] = [
        (lambda al, a, b: al._free._stack.append(al._free._stack[0]), "in the free list twice"),
        (lambda al, a, b: al._free._stack.append(99), "out-of-range block 99"),
        (lambda al, a, b: put(al, "_live", dict(reversed(al._live.items()))), "out of order"),
        (lambda al, a, b: al._by_owner["o"].clear(), "missing from its owner's index"),
        (lambda al, a, b: put(a, "_capacity_tokens", 99), "has a wrong capacity"),
        (lambda al, a, b: put(a, "_blocks", (99,)), "holds out-of-range block 99"),
        (lambda al, a, b: al._by_owner.__setitem__("x", {}), "still indexed"),
        (lambda al, a, b: al._by_owner.__setitem__("x", {9: a}), "disagree"),
        (lambda al, a, b: put(al, "_num_free", al._num_free + 1), "free count says 6"),
        (lose_one, "blocks neither free nor allocated"),
    ]
    return all(want in corrupt(how) for how, want in cases)


def _tombstones_off(w: ContractWorld) -> bool:
    """``max_tombstones=0`` remembers no ended life: a source that comes after its life's
    Cancel is kept (the engine chose to remember nothing)."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    sender = EmbeddingSender(transport, max_tombstones=0)
    transport.cancel("x", NO_EPOCH, incarnation=1)
    sender.step()
    snap = sender.snapshot()
    return snap.cancelled == () and snap.ended == () and sender.add("x", source(4), incarnation=1)


def _named_source_twice(w: ContractWorld) -> bool:
    """A second source for a life that has one raises DuplicateRequestError naming the life,
    and keeps the first."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(8, 4), HIDDEN, device="cpu"))
    sender = EmbeddingSender(transport)
    sender.add("x", source(4), incarnation=3)
    try:
        sender.add("x", source(6), incarnation=3)
    except DuplicateRequestError as error:
        kept = [s.total for s in dict(sender.snapshot().lives)["x"]]
        return "life 3 of request 'x'" in str(error) and kept == [4]
    return False


def _restore_round_trips(w: ContractWorld) -> bool:
    """A fresh receiver or sender restored from another's snapshot holds every field of it:
    a snapshot rebuilt from its state (not the one ``restore`` primed) equals the one
    given, with counts, quarantine, finished ids, ended lives, tombstones and a lost peer
    all set (a field ``restore`` dropped would leak one explored state into the next)."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(16, 4), HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 4, max_resume_tokens=4)
    sender = EmbeddingSender(transport)
    a = receiver.add("a")
    sender.add("a", source(16), incarnation=a)
    sender.add("b", source(4), incarnation=receiver.add("b"))
    receiver.add("p")  # its round 0 is parked: no source
    transport.cancel("q", NO_EPOCH, incarnation=5)  # a tombstone
    receiver.step()
    first = list(transport.posts)  # round 0 of a, b and p
    sender.step()
    receiver.step()
    sender.step()
    transport.posts.extend(first[:2])  # a's round 0 again (a repeat), b's (b ended: stale)
    transport.report(Landed("zz", 0, 1, 1, True, incarnation=9))  # an orphan
    transport.report(Landed("a", 0, 4, 16, False, incarnation=a))  # stale: round 0 again
    transport.in_flight.append(("junk",))  # type: ignore[arg-type]  # malformed
    transport.posts.append(("junk",))  # type: ignore[arg-type]
    receiver.step()
    sender.step()
    receiver.abort("a")  # its round in flight is quarantined, its end not yet handed over

    def round_trips() -> bool:
        again = ResumableReceiver(transport.buffers, transport, 4, max_resume_tokens=4)
        fresh = EmbeddingSender(transport)
        again.restore(receiver.snapshot())
        fresh.restore(sender.snapshot())
        again._snap, fresh._snap = None, None
        return again.snapshot() == receiver.snapshot() and fresh.snapshot() == sender.snapshot()

    r1, s1 = receiver.snapshot(), sender.snapshot()
    if not round_trips():
        return False
    transport.crash_sender("gone")
    receiver.step()  # the peer is lost: everything fails, the quarantine empties
    if not round_trips():
        return False
    rich = r1.stale_statuses and r1.orphan_statuses and r1.malformed_statuses
    counted = s1.rounds_served and s1.repeated_posts and s1.stale_posts and s1.malformed_posts
    sent = bool(counted and s1.parked and s1.cancelled and s1.ended)
    return bool(rich and r1.quarantine and r1.finished and sent and receiver.peer_lost)


def _admission_waits_as_one(w: ContractWorld) -> bool:
    """An admission that finds no blocks waits in the admissions queue only, not among
    the resumes (the snapshot's ``resumes`` are rounds after round 0)."""
    transport = InProcessTransport(BlockBuffers(BlockAllocator(2, 4), HIDDEN, device="cpu"))
    receiver = ResumableReceiver(transport.buffers, transport, 8)
    receiver.add("first")
    receiver.add("second")
    receiver.step()  # the first takes both blocks; the second waits
    snap = receiver.snapshot()
    return snap.resumes == () and [r.rid for r in snap.admissions] == ["second"]


#: (name, a call that must succeed and return True)
GOOD: Final[list[tuple[str, Callable[[ContractWorld], bool]]]] = [
    (
        "blocks_for 0 and 5",
        lambda w: (w.allocator.blocks_for(0), w.allocator.blocks_for(5)) == (0, 2),
    ),
    ("free_owner of an owner holding nothing", lambda w: w.allocator.free_owner("nobody") == 0),
    ("free_owner of the engine's one allocation", lambda w: w.allocator.free_owner("engine") == 1),
    (
        "allocate_up_to with the smallest minimum",
        lambda w: w.allocator.allocate_up_to(1, "o", 1) is not None,
    ),
    ("the allocator's own invariants hold", _invariants_hold),
    (
        "the receiver's smallest sizes",
        lambda w: _R(w.buffers, w.transport, 1, max_resume_tokens=1).max_resume_tokens == 1,
    ),
    ("the default round from the environment", _env_default),
    ("a policy's defaults", _policy_defaults),
    ("round 0 learned with auto", _auto_learns),
    ("a sender keeping two tombstones", _tombstones_kept),
    ("a late source of a life with no tombstone", _late_source_of_another_life),
    ("ended lives of the last ids only", _ended_bounded),
    ("a newer life's post ends the older lives", _older_life_ended_by_a_newer),
    ("outstanding_of an owner holding nothing", lambda w: w.allocator.outstanding_of("x") == ()),
    ("the blocks each reuse order hands back", _reuse_orders),
    ("a repeated post is counted and ignored", _repeated_post_ignored),
    ("the allocator's self-check names each corruption", _self_check_names_each_corruption),
    ("a sender keeping no tombstones", _tombstones_off),
    ("a second source for a life", _named_source_twice),
    ("restore round-trips every field", _restore_round_trips),
    ("an admission waits as an admission", _admission_waits_as_one),
    ("free_owner frees all of an owner's allocations", _free_owner_frees_all),
    ("a fresh receiver and sender have counted nothing", _fresh_counts),
    ("an id the transport carries", _narrow_add_accepts),
    ("an id the sender's transport carries", _narrow_sender_add_accepts),
    ("size hints learn apart", _hints_kept_apart),
    ("membership of ids", _membership),
    ("a request admitted once bootstrapped", _bootstrapped),
    ("a sender's leak names the id", _sender_leak_named),
    ("an observer hears each round consumed", _observer_hears),
    ("an early post overlaps the copy-out", _early_post_overlaps),
    ("an observer hears a failure", _observer_hears_failure),
    ("an early post is whole or not made", _early_post_whole),
    ("a sender error's reason is kept", _sender_error_reason_kept),
    ("a failed copy-out fails its request", _copy_out_failure_fails_request),
    ("a status for a round never posted names the one in flight", _unexpected_round_named),
    ("allocate of an int-like size", _index_sized),
    ("check_invariants names a wrong capacity", _wrong_capacity_seen),
    ("check_invariants names a block lost", _missing_block_seen),
    ("check_invariants names a free block past the pool", _block_past_the_pool_seen),
    ("check_invariants names a block both held and free", _block_free_and_held_seen),
    ("restore primes the receiver's snapshot", _restore_primes_snapshot),
    ("restore puts the sender back and primes its snapshot", _sender_restore_primes_snapshot),
    ("check_invariants sees a generation never issued", _unissued_generation_seen),
    (
        "a sender keeping no tombstones",
        lambda w: _S(w.transport, max_tombstones=0).max_tombstones == 0,
    ),
]


@dataclass(frozen=True)
class ContractReport:
    """What :func:`check_contracts` checked and what broke; ``ok`` only if it checked something."""

    cases: int
    broken: tuple[tuple[str, str], ...]  # (case, what went wrong)

    @property
    def ok(self) -> bool:
        return self.cases > 0 and not self.broken


def check_case(w: ContractWorld, case: Case) -> str | None:
    """What is wrong with how ``w`` answers one bad call, or ``None``."""
    _name, call, error, word = case
    try:
        before, tensors = w.snapshot(), w.tensors()
    except Exception as failed:  # the shipped objects cannot say what they hold: a finding
        return f"the world's snapshot raised {type(failed).__name__}: {failed}"
    try:
        call(w)
    except BaseException as raised:
        if not isinstance(raised, error) or not isinstance(raised, ResumeKitError):
            return f"raised {type(raised).__name__}: {raised}, not {error.__name__}"
        # A whole word: "XXridXX must be hashable" does not name rid.
        if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", str(raised)):
            return f"its message does not name {word!r}: {raised}"
    else:
        return f"accepted the bad value instead of raising {error.__name__}"
    try:
        after = w.snapshot()
    except Exception as failed:
        return f"refused, but the world's snapshot then raised {type(failed).__name__}: {failed}"
    if after != before:
        return "refused, but changed the receiver, sender, allocator or transport"
    if not all(torch.equal(x, y) for x, y in zip(tensors, w.tensors(), strict=True)):
        return "refused, but changed the buffers' bytes"
    return None


def check_contracts() -> ContractReport:
    """Every case on a fresh world, every good call, then every case on one world that must
    still finish its requests afterwards."""
    broken: list[tuple[str, str]] = []
    checked = len(CASES) + len(GOOD) + 1
    try:
        make_world()
    except Exception as error:  # the shipped objects refuse good arguments: nothing else runs
        return ContractReport(
            checked, (("a fresh world", f"raised {type(error).__name__}: {error}"),)
        )
    for case in CASES:
        problem = check_case(make_world(), case)
        if problem is not None:
            broken.append((case[0], problem))
    for name, good in GOOD:
        try:
            if not good(make_world()):
                broken.append((name, "returned the wrong value"))
        except Exception as error:
            broken.append((name, f"raised {type(error).__name__}: {error}"))
    problem = _still_works()
    if problem is not None:
        broken.append(("after every refusal", problem))
    return ContractReport(checked, tuple(broken))


def _still_works() -> str | None:
    """The refusals leave a receiver and sender that finish what they hold."""
    w = make_world()
    for case in CASES:
        with contextlib.suppress(BaseException):  # each was judged above
            case[1](w)
    try:
        rng = random.Random(0)
        w.sender.add("busy", source(40, seed=2))
        for _ in range(20):
            w.transport.shuffle(rng)
            w.sender.step()
            w.receiver.step()
        if not (w.receiver.take("busy").ok and w.receiver.take("done").ok):
            return "a request did not finish"
        w.allocator.free(w.held)
        w.receiver.check_quiescent()
        w.sender.check_quiescent()
    except Exception as error:
        return f"raised {type(error).__name__}: {error}"
    return None


__all__ = [
    "ALLOCATOR",
    "CASES",
    "EMB",
    "FILL",
    "GOOD",
    "HIDDEN",
    "MROPE",
    "RECEIVER",
    "SENDER",
    "SNAPSHOTS",
    "Case",
    "ContractReport",
    "ContractWorld",
    "E",
    "Forged",
    "check_case",
    "check_contracts",
    "good_args",
    "make_world",
    "source",
]
