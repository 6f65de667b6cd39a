"""Every public entry point answers a bad value with a typed error that names the
argument, and changes nothing: one table of cases over a world with requests in
every phase (finished, in flight, a held and a freed allocation)."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    CapacityExceededError,
    EmbeddingTensors,
    ForeignAllocationError,
    InvalidArgumentError,
    ResumeKitError,
    UseAfterFreeError,
)
from resumekit.allocator.block_allocator import MAX_NUM_BLOCKS
from resumekit.properties.allocator_machine import allocator_machine, resumekit_allocator_machine
from resumekit.properties.bounds import Bounds, InvalidBounds
from resumekit.properties.contracts import (
    ALLOCATOR,
    EMB,
    FILL,
    HIDDEN,
    MROPE,
    RECEIVER,
    SENDER,
    SNAPSHOTS,
    Case,
    E,
    check_case,
    good_args,
    make_world,
    source,
)
from resumekit.properties.contracts import ContractWorld as World
from resumekit.properties.contracts import Forged as _Forged
from resumekit.properties.draws import forged_tensors
from resumekit.properties.explorer import explore
from resumekit.properties.fuzz import fuzz, replay
from resumekit.properties.protocol_machine import protocol_machine
from resumekit.properties.strategies import strategy
from resumekit.properties.verify import verify
from resumekit.protocol import (
    ENV_DEFAULT_ALLOCATE_TOKENS,
    EmbeddingSender,
    Landed,
    PeerLost,
    ResumableReceiver,
    RoundPost,
    TransferState,
)
from resumekit.protocol.declaration import Event, next_state
from resumekit.sim.simulate import random_source, simulate
from resumekit.transports.inprocess import InProcessTransport
from resumekit.transports.torch import TorchDistributedTransport, TorchEnd
from resumekit.transports.torch.receiver import TorchReceiverEnd
from resumekit.transports.torch.sender import TorchSenderEnd

BUFFERS: list[Case] = [
    ("BlockBuffers allocator None", lambda w: BlockBuffers(None, 8), E, "allocator"),  # type: ignore[arg-type]
    ("BlockBuffers allocator str", lambda w: BlockBuffers("a", 8), E, "allocator"),  # type: ignore[arg-type]
    ("BlockBuffers hidden 0", lambda w: BlockBuffers(w.allocator, 0), E, "hidden_size"),
    ("BlockBuffers hidden -1", lambda w: BlockBuffers(w.allocator, -1), E, "hidden_size"),
    ("BlockBuffers hidden str", lambda w: BlockBuffers(w.allocator, "8"), E, "hidden_size"),  # type: ignore[arg-type]
    ("BlockBuffers hidden float", lambda w: BlockBuffers(w.allocator, 8.0), E, "hidden_size"),  # type: ignore[arg-type]
    (
        "BlockBuffers hidden 2**50",
        lambda w: BlockBuffers(w.allocator, 2**50),
        CapacityExceededError,
        "bytes",
    ),
    (
        "BlockBuffers too big for the machine",
        lambda w: BlockBuffers(BlockAllocator(1 << 20, 64), 1 << 20),
        CapacityExceededError,
        "hidden_size",
    ),
    (
        "BlockBuffers dtype int",
        lambda w: BlockBuffers(w.allocator, 8, dtype=torch.int32),
        E,
        "dtype",
    ),
    ("BlockBuffers dtype str", lambda w: BlockBuffers(w.allocator, 8, dtype="bf16"), E, "dtype"),  # type: ignore[arg-type]
    ("BlockBuffers dtype None", lambda w: BlockBuffers(w.allocator, 8, dtype=None), E, "dtype"),  # type: ignore[arg-type]
    ("BlockBuffers device tpu", lambda w: BlockBuffers(w.allocator, 8, device="tpu"), E, "device"),
    (
        "BlockBuffers device object",
        lambda w: BlockBuffers(w.allocator, 8, device=_Forged()),  # type: ignore[arg-type]
        E,
        "device",
    ),
    ("BlockBuffers aux_size 1", lambda w: BlockBuffers(w.allocator, 8, aux_size=1), E, "aux_size"),
    (
        "BlockBuffers aux_size str",
        lambda w: BlockBuffers(w.allocator, 8, aux_size="16"),  # type: ignore[arg-type]
        E,
        "aux_size",
    ),
    (
        "BlockBuffers aux_size 2**40",
        lambda w: BlockBuffers(w.allocator, 8, aux_size=2**40),
        CapacityExceededError,
        "aux_size",
    ),
    ("new_output -1", lambda w: w.buffers.new_output(-1), E, "num_tokens"),
    ("new_output str", lambda w: w.buffers.new_output("4"), E, "num_tokens"),  # type: ignore[arg-type]
    ("new_output 2**50", lambda w: w.buffers.new_output(2**50), CapacityExceededError, "bytes"),
    ("write None allocation", lambda w: w.buffers.write(None, *good_args()), E, "allocation"),  # type: ignore[arg-type]
    (
        "write freed allocation",
        lambda w: w.buffers.write(w.freed, *good_args()),
        UseAfterFreeError,
        "allocation",
    ),
    (
        "write foreign allocation",
        lambda w: w.buffers.write(w.foreign, *good_args()),
        ForeignAllocationError,
        "allocation",
    ),
    (
        "write list embeddings",
        lambda w: w.buffers.write(w.held, [[0.0]], FILL, MROPE),
        E,
        "embeddings",
    ),  # type: ignore[arg-type]
    (
        "write wrong hidden",
        lambda w: w.buffers.write(w.held, EMB[:, :4].contiguous(), FILL, MROPE),
        E,
        "embeddings",
    ),
    ("write float32", lambda w: w.buffers.write(w.held, EMB.float(), FILL, MROPE), E, "embeddings"),
    ("write int64 fill", lambda w: w.buffers.write(w.held, EMB, FILL.long(), MROPE), E, "fill_ids"),
    ("write short fill", lambda w: w.buffers.write(w.held, EMB, FILL[:3], MROPE), E, "fill_ids"),
    ("write transposed mrope", lambda w: w.buffers.write(w.held, EMB, FILL, MROPE.t()), E, "mrope"),
    ("write 2-row mrope", lambda w: w.buffers.write(w.held, EMB, FILL, MROPE[:2]), E, "mrope"),
    ("write too many tokens", lambda w: w.buffers.write(w.held, *good_args(5)), E, "tokens"),
    ("write no tokens", lambda w: w.buffers.write(w.held, *good_args(0)), E, "token"),
    ("write aux int", lambda w: w.buffers.write(w.held, *good_args(), aux=5), E, "aux"),  # type: ignore[arg-type]
    ("write aux str", lambda w: w.buffers.write(w.held, *good_args(), aux="ab"), E, "aux"),
    ("write aux too long", lambda w: w.buffers.write(w.held, *good_args(), aux=[1] * 17), E, "aux"),
    ("write aux empty", lambda w: w.buffers.write(w.held, *good_args(), aux=[]), E, "aux"),
    ("write aux 2**31", lambda w: w.buffers.write(w.held, *good_args(), aux=[2**31]), E, "aux"),
    ("write aux floats", lambda w: w.buffers.write(w.held, *good_args(), aux=[1.5]), E, "aux"),  # type: ignore[list-item]
    (
        "write aux float tensor",
        lambda w: w.buffers.write(w.held, *good_args(), aux=torch.zeros(2)),
        E,
        "aux",
    ),
    ("read_into n 0", lambda w: w.buffers.read_into(w.held, 0, w.buffers.new_output(4), 0), E, "n"),
    (
        "read_into n str",
        lambda w: w.buffers.read_into(w.held, "1", w.buffers.new_output(4), 0),  # type: ignore[arg-type]
        E,
        "n",
    ),
    (
        "read_into beyond capacity",
        lambda w: w.buffers.read_into(w.held, 5, w.buffers.new_output(8), 0),
        E,
        "capacity",
    ),
    (
        "read_into offset -1",
        lambda w: w.buffers.read_into(w.held, 1, w.buffers.new_output(4), -1),
        E,
        "offset",
    ),
    (
        "read_into past the destination",
        lambda w: w.buffers.read_into(w.held, 4, w.buffers.new_output(4), 1),
        E,
        "offset",
    ),
    ("read_into out str", lambda w: w.buffers.read_into(w.held, 1, "out", 0), E, "out"),  # type: ignore[arg-type]
    (
        "read_into out of another hidden",
        lambda w: w.buffers.read_into(w.held, 1, EmbeddingTensors.empty(4, 3), 0),
        E,
        "out.embeddings",
    ),
    (
        "read_into out float16",
        lambda w: w.buffers.read_into(
            w.held, 1, EmbeddingTensors.empty(4, HIDDEN, dtype=torch.float16), 0
        ),
        E,
        "out.embeddings",
    ),
    (
        "read_into out not contiguous",
        lambda w: w.buffers.read_into(
            w.held,
            1,
            EmbeddingTensors(
                torch.zeros(HIDDEN, 4, dtype=torch.bfloat16).t(),
                torch.zeros(4, dtype=torch.int32),
                torch.zeros(3, 4, dtype=torch.int32),
            ),
            0,
        ),
        E,
        "contiguous",
    ),
    (
        "read_into freed",
        lambda w: w.buffers.read_into(w.freed, 1, w.buffers.new_output(4), 0),
        UseAfterFreeError,
        "allocation",
    ),
    ("read_aux None", lambda w: w.buffers.read_aux(None), E, "allocation"),  # type: ignore[arg-type]
    ("read_aux freed", lambda w: w.buffers.read_aux(w.freed), UseAfterFreeError, "allocation"),
]

TENSORS: list[Case] = [
    (
        "EmbeddingTensors embeddings None",
        lambda w: EmbeddingTensors(None, FILL, MROPE),
        E,
        "embeddings",
    ),  # type: ignore[arg-type]
    ("EmbeddingTensors fill_ids None", lambda w: EmbeddingTensors(EMB, None, MROPE), E, "fill_ids"),  # type: ignore[arg-type]
    ("EmbeddingTensors mrope list", lambda w: EmbeddingTensors(EMB, FILL, [[0]]), E, "mrope"),  # type: ignore[arg-type]
    (
        "EmbeddingTensors 1-D embeddings",
        lambda w: EmbeddingTensors(EMB[0], FILL, MROPE),
        E,
        "embeddings",
    ),
    (
        "EmbeddingTensors 3-D embeddings",
        lambda w: EmbeddingTensors(EMB.unsqueeze(0), FILL, MROPE),
        E,
        "embeddings",
    ),
    (
        "EmbeddingTensors short fill",
        lambda w: EmbeddingTensors(EMB, FILL[:3], MROPE),
        E,
        "fill_ids",
    ),
    (
        "EmbeddingTensors 2-D fill",
        lambda w: EmbeddingTensors(EMB, FILL.view(1, 4), MROPE),
        E,
        "fill_ids",
    ),
    (
        "EmbeddingTensors transposed mrope",
        lambda w: EmbeddingTensors(EMB, FILL, MROPE.t()),
        E,
        "mrope",
    ),
    ("EmbeddingTensors 2-row mrope", lambda w: EmbeddingTensors(EMB, FILL, MROPE[:2]), E, "mrope"),
    (
        "EmbeddingTensors int64 fill",
        lambda w: EmbeddingTensors(EMB, FILL.long(), MROPE),
        E,
        "fill_ids",
    ),
    (
        "EmbeddingTensors float fill",
        lambda w: EmbeddingTensors(EMB, FILL.float(), MROPE),
        E,
        "fill_ids",
    ),
    (
        "EmbeddingTensors int64 mrope",
        lambda w: EmbeddingTensors(EMB, FILL, MROPE.long()),
        E,
        "mrope",
    ),
    (
        "EmbeddingTensors integer embeddings",
        lambda w: EmbeddingTensors(EMB.int(), FILL, MROPE),
        E,
        "embeddings",
    ),
    (
        "EmbeddingTensors two devices",
        lambda w: EmbeddingTensors(EMB.to("meta"), FILL, MROPE),
        E,
        "device",
    ),
    ("empty num_tokens -1", lambda w: EmbeddingTensors.empty(-1, 8), E, "num_tokens"),
    ("empty num_tokens str", lambda w: EmbeddingTensors.empty("4", 8), E, "num_tokens"),  # type: ignore[arg-type]
    ("empty hidden 0", lambda w: EmbeddingTensors.empty(4, 0), E, "hidden_size"),
    ("empty hidden -1", lambda w: EmbeddingTensors.empty(4, -1), E, "hidden_size"),
    ("empty hidden str", lambda w: EmbeddingTensors.empty(4, "x"), E, "hidden_size"),  # type: ignore[arg-type]
    ("empty dtype int64", lambda w: EmbeddingTensors.empty(4, 8, dtype=torch.int64), E, "dtype"),
    ("empty dtype str", lambda w: EmbeddingTensors.empty(4, 8, dtype="x"), E, "dtype"),  # type: ignore[arg-type]
    ("empty device tpu", lambda w: EmbeddingTensors.empty(4, 8, device="tpu"), E, "device"),
    (
        "empty too big",
        lambda w: EmbeddingTensors.empty(2**40, 2**20),
        CapacityExceededError,
        "bytes",
    ),
    ("narrow start -1", lambda w: source(4).narrow(-1, 2), E, "start"),
    ("narrow start past the end", lambda w: source(4).narrow(5, 0), E, "start"),
    ("narrow length past the end", lambda w: source(4).narrow(2, 3), E, "length"),
    ("narrow length -1", lambda w: source(4).narrow(0, -1), E, "length"),
    ("narrow start str", lambda w: source(4).narrow("0", 1), E, "start"),  # type: ignore[arg-type]
    ("equal None", lambda w: source(4).equal(None), E, "other"),  # type: ignore[arg-type]
    ("equal tuple", lambda w: source(4).equal((EMB, FILL, MROPE)), E, "other"),  # type: ignore[arg-type]
]


def _valid_post(w: World) -> RoundPost:
    return RoundPost(
        "busy", 0, w.post.blocks, w.post.capacity_tokens, 0, w.post.allocation, incarnation=2
    )


TRANSPORT: list[Case] = [
    ("InProcessTransport None", lambda w: InProcessTransport(None), E, "buffers"),  # type: ignore[arg-type]
    ("InProcessTransport allocator", lambda w: InProcessTransport(w.allocator), E, "buffers"),  # type: ignore[arg-type]
    ("post_round str", lambda w: w.transport.post_round("x"), E, "post"),  # type: ignore[arg-type]
    (
        "post_round str epoch",
        lambda w: w.transport.post_round(RoundPost("r", "0", (1,), 4, 0, incarnation=1)),  # type: ignore[arg-type]
        E,
        "post",
    ),
    (
        "post_round list blocks",
        lambda w: w.transport.post_round(RoundPost("r", 0, [1], 4, 0, incarnation=1)),  # type: ignore[arg-type]
        E,
        "post",
    ),
    ("cancel list rid", lambda w: w.transport.cancel([], 0, incarnation=1), E, "rid"),  # type: ignore[arg-type]
    ("cancel str epoch", lambda w: w.transport.cancel("r", "0", incarnation=1), E, "epoch"),  # type: ignore[arg-type]
    ("cancel epoch -2", lambda w: w.transport.cancel("r", -2, incarnation=1), E, "epoch"),
    ("cancel incarnation 0", lambda w: w.transport.cancel("r", 0, incarnation=0), E, "incarnation"),
    ("report str", lambda w: w.transport.report("x"), E, "status"),  # type: ignore[arg-type]
    (
        "report str tokens",
        lambda w: w.transport.report(Landed("busy", 0, "4", 4, True, incarnation=2)),  # type: ignore[arg-type]
        E,
        "status",
    ),
    ("report PeerLost", lambda w: w.transport.report(PeerLost("gone")), E, "status"),  # type: ignore[arg-type]
    ("write_round str post", lambda w: w.transport.write_round("x", source(4), None), E, "post"),  # type: ignore[arg-type]
    (
        "write_round tuple data",
        lambda w: w.transport.write_round(_valid_post(w), (EMB, FILL, MROPE), None),  # type: ignore[arg-type]
        E,
        "data",
    ),
    ("duplicate 99", lambda w: w.transport.duplicate(99), E, "index"),
    ("duplicate str", lambda w: w.transport.duplicate("0"), E, "index"),  # type: ignore[arg-type]
    ("shuffle None", lambda w: w.transport.shuffle(None), E, "rng"),  # type: ignore[arg-type]
    ("shuffle seed", lambda w: w.transport.shuffle(42), E, "rng"),  # type: ignore[arg-type]
    ("crash_sender int reason", lambda w: w.transport.crash_sender(5), E, "reason"),  # type: ignore[arg-type]
    ("restart_sender None reason", lambda w: w.transport.restart_sender(None), E, "reason"),  # type: ignore[arg-type]
]


def _torch(*args: Any, **kwargs: Any) -> Callable[[World], object]:
    return lambda w: TorchDistributedTransport(*args, **kwargs)


def _torch_receiver(**kwargs: Any) -> Callable[[World], object]:
    return lambda w: TorchDistributedTransport("receiver", 1, buffers=w.buffers, **kwargs)


TORCH: list[Case] = [
    ("torch role", _torch("encoder", 1), E, "role"),
    ("torch peer -1", _torch("sender", -1), E, "peer"),
    ("torch peer str", _torch("sender", "1"), E, "peer"),
    ("torch receiver without buffers", _torch("receiver", 1), E, "buffers"),
    ("torch buffers str", _torch("receiver", 1, buffers="x"), E, "buffers"),
    ("torch timeout 0", _torch_receiver(timeout=0), E, "timeout"),
    ("torch timeout -1", _torch_receiver(timeout=-1), E, "timeout"),
    ("torch timeout inf", _torch_receiver(timeout=math.inf), E, "timeout"),
    ("torch timeout nan", _torch_receiver(timeout=math.nan), E, "timeout"),
    ("torch timeout str", _torch_receiver(timeout="5"), E, "timeout"),
    ("torch timeout bool", _torch_receiver(timeout=True), E, "timeout"),
    ("torch timeout 10**9", _torch_receiver(timeout=10**9), E, "timeout"),
    ("torch aux_size 1", _torch("sender", 1, aux_size=1), E, "aux_size"),
    ("torch aux_size str", _torch("sender", 1, aux_size="16"), E, "aux_size"),
    ("torch owns_group str", _torch("sender", 1, owns_group="yes"), E, "owns_group"),
    ("torch match", _torch("sender", 1, match="bytag"), E, "match"),
    ("torch group str", _torch("sender", 1, group="world"), E, "group"),
    ("torch data_group int", _torch("sender", 1, data_group=5), E, "data_group"),
    ("torch post_round str", lambda w: _end(TorchReceiverEnd).post_round("x"), E, "post"),
    (
        "torch cancel epoch -5",
        lambda w: _end(TorchReceiverEnd).cancel(1, -5, incarnation=1),
        E,
        "epoch",
    ),
    ("torch report str", lambda w: _end(TorchSenderEnd).report("x"), E, "status"),
    (
        "torch write_round tuple data",
        lambda w: _end(TorchSenderEnd).write_round(_valid_post(w), (EMB, FILL, MROPE), None),
        E,
        "data",
    ),
    (
        "torch transport refuses a str id at add",
        lambda w: _IntIdsTransport(w.buffers).receiver_for(w).add("a"),
        E,
        "rid",
    ),
    (
        "torch transport refuses an id past int64 at add",
        lambda w: _IntIdsTransport(w.buffers).receiver_for(w).add(2**63),
        E,
        "rid",
    ),
    (
        "torch sender refuses a str id at add",
        lambda w: EmbeddingSender(_IntIdsTransport(w.buffers)).add("a", source(4)),
        E,
        "rid",
    ),
]


def _end(end: type[TorchDistributedTransport]) -> Any:
    """An end of the torch transport that never connected: its sending calls check first."""
    return object.__new__(end)


class _NoAllocator:
    """Has the buffers' methods but no allocator."""

    def new_output(self) -> None: ...
    def read_into(self) -> None: ...
    def read_aux(self) -> None: ...


class _IntIdsTransport(InProcessTransport):
    """An in-process transport that carries ids as TorchDistributedTransport does."""

    check_request_id = TorchEnd.check_request_id

    def receiver_for(self, w: World) -> ResumableReceiver:
        return ResumableReceiver(w.buffers, self, 16)


PROPERTIES: list[Case] = [
    ("Bounds blocks 0", lambda w: Bounds(blocks=0), InvalidBounds, "blocks"),
    ("Bounds blocks str", lambda w: Bounds(blocks="3"), InvalidBounds, "blocks"),  # type: ignore[arg-type]
    ("Bounds requests 100", lambda w: Bounds(requests=100), InvalidBounds, "requests"),
    ("Bounds duplicates -1", lambda w: Bounds(duplicates=-1), InvalidBounds, "duplicates"),
    ("Bounds reuse", lambda w: Bounds(reuse="mru"), InvalidBounds, "reuse"),
    (
        "Bounds default > blocks",
        lambda w: Bounds(blocks=2, default_blocks=3),
        InvalidBounds,
        "default_blocks",
    ),
    ("explore str bounds", lambda w: explore("std", strategy("epoch")), E, "bounds"),  # type: ignore[arg-type]
    ("explore str strategy", lambda w: explore(Bounds(), "epoch"), E, "strategy"),  # type: ignore[arg-type]
    ("explore workers 0", lambda w: explore(Bounds(), strategy("epoch"), workers=0), E, "workers"),
    (
        "explore max_states 0",
        lambda w: explore(Bounds(), strategy("epoch"), max_states=0),
        E,
        "max_states",
    ),
    ("strategy unknown", lambda w: strategy("nope"), E, "nope"),
    ("fuzz unknown strategy", lambda w: fuzz("nope", max_examples=1), E, "nope"),
    ("fuzz max_examples 0", lambda w: fuzz("epoch", max_examples=0), E, "max_examples"),
    ("fuzz cap -1", lambda w: fuzz("epoch", max_examples=1, cap_seconds=-1), E, "cap_seconds"),
    (
        "fuzz start_seed str",
        lambda w: fuzz("epoch", max_examples=1, start_seed="a"),
        E,
        "start_seed",
    ),  # type: ignore[arg-type]
    ("verify examples 0", lambda w: verify(examples=0), E, "examples"),
    ("verify broken_examples 0", lambda w: verify(broken_examples=0), E, "broken_examples"),
    ("verify cap 0", lambda w: verify(cap_seconds=0), E, "cap_seconds"),
    ("verify workers 0", lambda w: verify(workers=0), E, "workers"),
    ("verify seed -1", lambda w: verify(seed=-1), E, "seed"),
    ("allocator_machine None", lambda w: allocator_machine(None), E, "make_adapter"),  # type: ignore[arg-type]
    (
        "resumekit_allocator_machine 0 blocks",
        lambda w: resumekit_allocator_machine(0),
        E,
        "num_blocks",
    ),
    (
        "resumekit_allocator_machine reuse",
        lambda w: resumekit_allocator_machine(reuse="mru"),
        E,
        "reuse",
    ),  # type: ignore[arg-type]
    ("protocol_machine unknown", lambda w: protocol_machine("nope"), E, "nope"),
    ("next_state str state", lambda w: next_state("Success", Event.LANDED), E, "state"),  # type: ignore[arg-type]
    ("next_state str event", lambda w: next_state(TransferState.Success, "landed"), E, "event"),  # type: ignore[arg-type]
    ("simulate tokens 0", lambda w: simulate(0), E, "tokens"),
    ("simulate hidden 0", lambda w: simulate(10, hidden=0), E, "hidden_size"),
    ("simulate pool 0", lambda w: simulate(10, pool_blocks=0), E, "num_blocks"),
    ("simulate device tpu", lambda w: simulate(10, device="tpu"), E, "device"),
    ("random_source -1 tokens", lambda w: random_source(-1, 4), E, "num_tokens"),
    ("random_source hidden 0", lambda w: random_source(4, 0), E, "hidden"),
    # The sweep after the outside harness: siblings of what it found.
    ("random_source seed 2**80", lambda w: random_source(4, 4, seed=2**80), E, "seed"),
    ("random_source tokens 2**80", lambda w: random_source(2**80, 4), E, "num_tokens"),
    ("random_source hidden 2**40", lambda w: random_source(4, 2**40), E, "hidden_size"),
    (
        "random_source too big for the host",
        lambda w: random_source(2**31 - 1, 2**20),
        CapacityExceededError,
        "bytes",
    ),
    ("random_source device 2**80", lambda w: random_source(4, 4, device=2**80), E, "device"),  # type: ignore[arg-type]
    ("simulate device 2**80", lambda w: simulate(10, device=2**80), E, "device"),  # type: ignore[arg-type]
    (
        "simulate default_allocate str",
        lambda w: simulate(10, default_allocate="x"),
        E,
        "default_allocate",
    ),  # type: ignore[arg-type]
    ("fuzz cap str", lambda w: fuzz("epoch", max_examples=1, cap_seconds="1"), E, "cap_seconds"),  # type: ignore[arg-type]
    ("fuzz cap True", lambda w: fuzz("epoch", max_examples=1, cap_seconds=True), E, "cap_seconds"),
    ("fuzz progress 0", lambda w: fuzz("epoch", max_examples=1, progress=0), E, "progress"),  # type: ignore[arg-type]
    ("fuzz database int", lambda w: fuzz("epoch", max_examples=1, database=3), E, "database"),  # type: ignore[arg-type]
    ("fuzz database empty", lambda w: fuzz("epoch", max_examples=1, database=""), E, "database"),
    ("replay database None", lambda w: replay("epoch", None), E, "database"),  # type: ignore[arg-type]
    ("verify cap object", lambda w: verify(cap_seconds=object()), E, "cap_seconds"),  # type: ignore[arg-type]
    ("verify progress str", lambda w: verify(progress="x"), E, "progress"),  # type: ignore[arg-type]
    ("verify quick 1", lambda w: verify(quick=1), E, "quick"),  # type: ignore[arg-type]
    (
        "explore progress str",
        lambda w: explore(Bounds(), strategy("epoch"), progress="x"),  # type: ignore[arg-type]
        E,
        "progress",
    ),
]

CASES = (
    ALLOCATOR + BUFFERS + TENSORS + RECEIVER + SENDER + SNAPSHOTS + TRANSPORT + TORCH + PROPERTIES
)


def test_there_are_at_least_150_distinct_cases() -> None:
    names = [name for name, *_ in CASES]
    assert len(set(names)) == len(names) >= 150


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world()
    threads = threading.active_count()
    yield w
    assert threading.active_count() == threads  # nothing was left running
    w.allocator.check_invariants()


@pytest.mark.parametrize(("name", "call", "error", "names"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_value_is_refused_typed_named_and_changes_nothing(
    world: World,
    name: str,
    call: Callable[[World], object],
    error: type[BaseException],
    names: str,
) -> None:
    assert check_case(world, (name, call, error, names)) is None, name


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "8192 tokens"])
def test_a_bad_environment_default_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, world: World, value: str
) -> None:
    monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, value)
    with pytest.raises(InvalidArgumentError, match=ENV_DEFAULT_ALLOCATE_TOKENS):
        ResumableReceiver(world.buffers, world.transport)


def test_the_world_still_works_after_every_refusal(world: World) -> None:
    """The refusals above leave a receiver and sender that finish what they hold."""
    for _name, call, error, _names in CASES:
        with pytest.raises(error):
            call(world)
    rng = random.Random(0)
    world.sender.add("busy", source(40, seed=2))
    for _ in range(20):
        world.transport.shuffle(rng)
        world.sender.step()
        world.receiver.step()
    assert world.receiver.take("busy").ok and world.receiver.take("done").ok
    world.allocator.free(world.held)
    world.receiver.check_quiescent()
    world.sender.check_quiescent()


def test_the_messages_name_the_argument_exactly(world: World) -> None:
    """The table above checks that each message names its argument; these pin the words."""
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: world.allocator.is_live("x"), "allocation must be an Allocation, not str"),  # type: ignore[arg-type]
        (
            lambda: world.receiver.poll(["a"]),  # type: ignore[arg-type]
            "unknown request ['a']: rid must be hashable to be added",
        ),
        (
            lambda: world.receiver.take(["a"]),  # type: ignore[arg-type]
            "unknown request ['a']: rid must be hashable to be added",
        ),
        (lambda: world.receiver.abort("busy", reason=5), "reason must be a str, not int"),  # type: ignore[arg-type]
        (lambda: world.receiver.add("n", bootstrapped=1), "bootstrapped must be a bool, not int"),  # type: ignore[arg-type]
        (
            lambda: world.allocator.allocate(10**9, "o"),
            "num_tokens=1000000000 needs 250000000 blocks; the pool has 32",
        ),
        (
            lambda: _IntIdsTransport(world.buffers).receiver_for(world).add("a"),
            "rid must be an int64 over TorchDistributedTransport, not 'a'",
        ),
        (
            lambda: EmbeddingSender(_IntIdsTransport(world.buffers)).add("a", source(4)),
            "rid must be an int64 over TorchDistributedTransport, not 'a'",
        ),
        (
            lambda: world.sender.add("x", (EMB, FILL, MROPE)),  # type: ignore[arg-type]
            "source must be EmbeddingTensors, not tuple",
        ),
        (
            lambda: world.sender.add("x", forged_tensors([1.0], [1], [[1], [2], [3]])),
            "source fields must be torch tensors",
        ),
        (
            lambda: world.sender.add("x", forged_tensors(EMB, FILL.to("meta"), MROPE)),
            "source tensors are on cpu, meta and cpu; they must share one device",
        ),
        (
            lambda: world.sender.add("x", source(4), mrope_delta=2**31),
            "mrope_delta must fit in int32",
        ),
        (lambda: world.allocator.allocate(0, "o"), "num_tokens must be >= 1, got 0"),
        (lambda: world.allocator.allocate("3", "o"), "num_tokens must be an int, not str"),  # type: ignore[arg-type]
        (lambda: world.allocator.allocate(4, []), "owner must be hashable, not list"),  # type: ignore[arg-type]
        (lambda: world.allocator.allocate(128, []), "owner must be hashable, not list"),  # type: ignore[arg-type]
        (
            lambda: BlockAllocator(MAX_NUM_BLOCKS + 1, 1),
            "num_blocks=16,777,217 exceeds the 16,777,216 a pool may have: its free list alone "
            "would take 603,979,812 bytes of host memory (use larger blocks)",
        ),
        (lambda: world.allocator.allocate_up_to(0, "o"), "num_tokens must be >= 1, got 0"),
        (lambda: world.allocator.allocate_up_to(4, "o", 0), "min_tokens must be >= 1, got 0"),
        (
            lambda: world.allocator.allocate_up_to(10**9, "o", 10**9),
            "min_tokens=1000000000 needs 250000000 blocks; the pool has 32",
        ),
        (lambda: world.allocator.allocate_up_to(4, []), "owner must be hashable, not list"),  # type: ignore[arg-type]
        (lambda: world.allocator.allocate_up_to(10**4, []), "owner must be hashable, not list"),  # type: ignore[arg-type]
        (  # more than is free: refused for the owner before it returns None
            lambda: world.allocator.allocate_up_to(128, [], 128),  # type: ignore[arg-type]
            "owner must be hashable, not list",
        ),
        (
            lambda: ResumableReceiver(None, world.transport),  # type: ignore[arg-type]
            "buffers must be a BlockBuffers; NoneType has no new_output, read_into, read_aux",
        ),
        (
            lambda: ResumableReceiver(_NoAllocator(), world.transport),  # type: ignore[arg-type]
            "buffers must be a BlockBuffers; its allocator is missing",
        ),
        (
            lambda: ResumableReceiver(world.buffers, None),  # type: ignore[arg-type]
            "transport must be a ReceiverTransport; NoneType has no post_round, cancel, "
            "poll_statuses, check_request_id",
        ),
        (
            lambda: ResumableReceiver(world.buffers, world.transport, 16, observer=3),  # type: ignore[arg-type]
            "observer must be a ReceiverObserver; int has no round_posted, round_consumed, "
            "request_failed",
        ),
        (
            lambda: EmbeddingSender(None),  # type: ignore[arg-type]
            "transport must be a SenderTransport; NoneType has no poll_posts, write_round, "
            "report, check_request_id",
        ),
        (
            lambda: world.sender.add(
                "x", EmbeddingTensors(EMB.float().requires_grad_(), FILL, MROPE)
            ),
            "source.embeddings requires grad; pass embeddings.detach() (the transfer copies "
            "bytes and must not join an autograd graph)",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ResumeKitError) as info:
            call()
        assert str(info.value) == message


def test_a_source_must_count_its_tokens_in_int32(world: World) -> None:
    """Meta tensors have a shape and no storage: 2**31 tokens cost nothing to describe."""

    def huge(n: int) -> EmbeddingTensors:
        return EmbeddingTensors(
            torch.empty(n, 1, dtype=torch.bfloat16, device="meta"),
            torch.empty(n, dtype=torch.int32, device="meta"),
            torch.empty(3, n, dtype=torch.int32, device="meta"),
        )

    with pytest.raises(InvalidArgumentError) as info:
        world.sender.add("x", huge(2**31))
    assert str(info.value) == "source has 2147483648 tokens; the total must fit in int32"
    assert world.sender.add("x", huge(2**31 - 1))  # the most there can be


def test_the_mrope_delta_may_be_any_int32(world: World) -> None:
    for delta in (-(2**31) - 1, 2**31):
        with pytest.raises(InvalidArgumentError, match="mrope_delta must fit in int32"):
            world.sender.add("x", source(4), mrope_delta=delta)
    assert world.sender.add("x", source(4), mrope_delta=-(2**31))
    assert world.sender.add("y", source(4), mrope_delta=2**31 - 1)


def test_the_smallest_good_values_are_accepted(world: World) -> None:
    assert world.allocator.blocks_for(0) == 0 and world.allocator.blocks_for(5) == 2
    receiver = ResumableReceiver(world.buffers, world.transport, 1, max_resume_tokens=1)
    assert receiver.max_resume_tokens == 1 and receiver.default_allocate_tokens == 1
    assert EmbeddingSender(world.transport, max_tombstones=0).max_tombstones == 0
