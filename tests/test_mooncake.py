"""MooncakeTransport's own contract: what it refuses, what it says when it cannot load,
how it lays a round over the blocks, and both ends in one process on loopback."""

from __future__ import annotations

import gc
import importlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    EmbeddingSender,
    InvalidArgumentError,
    ResumableReceiver,
    TransferState,
    TransportError,
    TransportUnavailableError,
)
from resumekit.allocator import EmbeddingTensors
from resumekit.protocol.messages import PeerLost, SenderError
from resumekit.sim.simulate import random_source
from resumekit.transports.mooncake import (
    MooncakeReceiverEnd,
    MooncakeSenderEnd,
    MooncakeTransport,
    load_mooncake,
    wire_rid,
)
from resumekit.transports.mooncake.engine import start_engine
from resumekit.transports.mooncake.jsonwire import MAX_AUX, MAX_REASON_BYTES, MAX_RID_CHARS
from resumekit.transports.mooncake.receiver import MAX_STATUS_BYTES
from resumekit.transports.mooncake.sender import _runs

try:
    load_mooncake()
    MISSING = None
except TransportUnavailableError as error:
    MISSING = str(error)
needs_mooncake = pytest.mark.skipif(
    MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1",
    reason=str(MISSING),
)


def endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def buffers(num_blocks: int = 16, block_size: int = 8, hidden: int = 4) -> BlockBuffers:
    return BlockBuffers(BlockAllocator(num_blocks, block_size), hidden, device="cpu")


# -- without the engine ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "error"),
    [("zmq", ImportError("No module named 'zmq'")), ("mooncake.engine", OSError("libibverbs"))],
)
def test_a_missing_dependency_names_the_extra_and_the_system_packages(
    monkeypatch: pytest.MonkeyPatch, module: str, error: Exception
) -> None:
    real = importlib.import_module

    def fake(name: str, *args: Any) -> Any:
        if name == module:
            raise error
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(TransportUnavailableError) as caught:
        MooncakeTransport("sender", listen=endpoint(), peer=endpoint())
    text = str(caught.value)
    assert "pip install 'resumekit[mooncake]'" in text
    assert "libibverbs1" in text and "librdmacm1" in text
    assert str(error) in text
    assert isinstance(caught.value, TransportError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "both"}, "role must be 'receiver' or 'sender'"),
        ({"listen": "127.0.0.1:5"}, "listen must be a ZMQ endpoint"),
        ({"listen": 5}, "listen must be a str"),
        ({"peer": ""}, "peer must be a ZMQ endpoint"),
        ({"protocol": "udp"}, "protocol must be 'tcp' or 'rdma'"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"timeout": float("nan")}, "timeout must be > 0"),
        ({"aux_size": 1}, "aux_size must be >= 2"),
        ({"engine": object()}, "session: with an engine of your own"),
        ({"engine": object(), "session": "h:1"}, "engine: a object lacks register_memory"),
        ({"listen": "tcp://127.0.0.1:99999"}, "the port must be 1..65535"),
        ({"listen": "tcp://127.0.0.1:0"}, "the port must be 1..65535"),
        ({"peer": "tcp://127.0.0.1"}, "the port must be 1..65535"),
        ({"peer": "foo://bar"}, "peer must be a ZMQ endpoint"),
        ({"listen": "tcp://127.0.0.1:5", "peer": "tcp://127.0.0.1:5"}, "cannot be its own peer"),
        ({"buffers": "x"}, "buffers: the sender end writes into the receiver's; it takes none"),
        ({"role": "receiver", "buffers": "x"}, "needs the BlockBuffers rounds land in, not str"),
        ({"role": "receiver"}, "buffers: the receiver end needs the BlockBuffers"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"role": "sender", "listen": endpoint(), "peer": endpoint()}
    args |= kwargs
    role = args.pop("role")
    with pytest.raises(InvalidArgumentError, match=message):
        MooncakeTransport(role, **args)


def test_request_ids_travel_as_int64s_or_strs() -> None:
    assert wire_rid(7) == 7 and wire_rid("req-7") == "req-7"
    for bad in (2**63, 1.0, ("a",), "x" * 1025, True):
        with pytest.raises(InvalidArgumentError, match="rid must be an int64 or a str"):
            wire_rid(bad)


def test_a_round_goes_out_in_one_piece_per_run_of_following_blocks() -> None:
    data = random_source(20, 4)  # 20 tokens in blocks of 8: 8 + 8 + 4
    emb, row = 4 * 2, 4  # bytes per token: bf16 x 4, int32

    def at(block: int) -> list[int]:
        return [1000 + block * 8 * emb, 5000 + block * 8 * row, 7000 + block * 8 * row]

    # Blocks 3 and 4 follow on, block 9 does not.
    dst = [[*at(b)[:2], at(b)[2], at(b)[2] + 900, at(b)[2] + 1800, 0] for b in (3, 4, 9)]
    sources, targets = _runs(data, dst, 20, 8)
    assert len(sources) == 5 * 2  # five tensors, two runs each
    assert targets[:2] == [at(3)[0], at(9)[0]]
    assert [s.shape[0] for s in sources[:2]] == [16, 4]
    assert torch.equal(sources[1], data.embeddings[16:20])
    assert torch.equal(sources[6], data.mrope[1, :16])  # emb, fill, mRoPE rows 0, 1, 2


# -- both ends in this process ---------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers]]:
    if MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1":
        pytest.skip(MISSING)
    bufs = buffers()
    a, b = endpoint(), endpoint()
    receiver = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=5.0)
    sender = MooncakeTransport("sender", listen=b, peer=a, timeout=5.0)
    assert isinstance(receiver, MooncakeReceiverEnd) and isinstance(sender, MooncakeSenderEnd)
    yield receiver, sender, bufs
    for end in (sender, receiver):
        end.close(wait=5.0)


def run(receiver: ResumableReceiver, sender: EmbeddingSender, rid: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not receiver.poll(rid).terminal and time.monotonic() < deadline:
        receiver.step()
        sender.step()
        time.sleep(0.001)


@needs_mooncake
def test_a_transfer_resumes_through_the_engine_and_lands_intact(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers],
) -> None:
    end_r, end_s, bufs = pair
    receiver = ResumableReceiver(bufs, end_r, 24, max_resume_tokens=40)
    sender = EmbeddingSender(end_s)
    source = random_source(100, 4, seed=3)
    receiver.add("req-1")
    sender.add("req-1", source, mrope_delta=-7)
    run(receiver, sender, "req-1", 20.0)
    result = receiver.take("req-1")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(source)
    assert result.mrope_delta == -7
    assert bufs.allocator.num_free_blocks == bufs.num_blocks
    assert end_r.posted >= 3  # 24 + 40 + 36 tokens


@needs_mooncake
@pytest.mark.parametrize("aux_size", [3, 40])
def test_a_round_writes_the_receivers_whole_aux_row_and_nothing_past_it(aux_size: int) -> None:
    """The sender's end keeps its default aux_size (16): the receiver's rows decide. A
    longer stage ran into the next blocks' rows; a shorter one left stale values."""
    bufs = BlockBuffers(BlockAllocator(16, 8), 4, device="cpu", aux_size=aux_size)
    bufs.aux.fill_(-1)
    a, b = endpoint(), endpoint()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=5.0)
    end_s = MooncakeTransport("sender", listen=b, peer=a, timeout=5.0)
    try:
        receiver = ResumableReceiver(bufs, end_r, 24)
        sender = EmbeddingSender(end_s)
        source = random_source(20, 4, seed=16)
        receiver.add("a")
        sender.add("a", source, mrope_delta=5)
        run(receiver, sender, "a", 20.0)
        result = receiver.take("a")
        assert result.state is TransferState.Success, result.reason
        written = [row for row in bufs.aux.tolist() if row != [-1] * aux_size]
        assert written == [[20, 5] + [0] * (aux_size - 2)]  # one round, one row
    finally:
        end_s.close(wait=5.0)
        end_r.close(wait=5.0)


@needs_mooncake
def test_each_call_belongs_to_one_end(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers],
) -> None:
    end_r, end_s, _ = pair
    assert not hasattr(end_r, "poll_posts") and not hasattr(end_s, "poll_statuses")
    with pytest.raises(InvalidArgumentError, match="rid must be an int64 or a str"):
        ResumableReceiver(pair[2], end_r, 8).add(("a", 1))
    assert pair[2].allocator.num_free_blocks == pair[2].num_blocks


@needs_mooncake
def test_a_bound_endpoint_is_refused_by_the_constructor() -> None:
    a = endpoint()
    first = MooncakeTransport("sender", listen=a, peer=endpoint(), timeout=1.0)
    try:
        with pytest.raises(InvalidArgumentError, match="listen: cannot bind"):
            MooncakeTransport("sender", listen=a, peer=endpoint(), timeout=1.0)
    finally:
        first.close()


@needs_mooncake
def test_a_peer_that_never_comes_is_lost_and_its_writes_are_refused_after() -> None:
    bufs = buffers()
    end = MooncakeTransport(
        "receiver", listen=endpoint(), peer=endpoint(), buffers=bufs, timeout=1.0
    )
    start = time.monotonic()
    statuses: list[Any] = []
    while not statuses and time.monotonic() - start < 10:
        statuses = list(end.poll_statuses())
        end.wait(0.05)
    assert [type(s) for s in statuses] == [PeerLost]
    assert "made no progress for 1 s" in statuses[0].reason
    assert 1.0 <= time.monotonic() - start < 5.0
    # The buffers are unregistered: the engine refuses a write into them now.
    other, _ = start_engine(load_mooncake()[0], "127.0.0.1", "tcp")  # never torn down
    src = torch.ones(16, dtype=torch.uint8)
    rc = other.transfer_sync_write(end.session, src.data_ptr(), bufs.fill_ids.data_ptr(), 16)
    assert rc != 0
    assert not bool(bufs.fill_ids.any())
    started = time.monotonic()
    end.close()
    assert time.monotonic() - started < 2.0


@needs_mooncake
def test_closing_never_hangs_when_the_peer_never_answered() -> None:
    end = MooncakeTransport("receiver", listen=endpoint(), peer=endpoint(), buffers=buffers())
    started = time.monotonic()
    end.shutdown(timeout=1.0)  # says close to a peer that is not there
    assert time.monotonic() - started < 3.0
    assert end.closed


# -- the writer and the engine ------------------------------------------------------------


class ScriptedEngine:
    """A real engine whose async writes can be refused, failed or slowed, call by call."""

    def __init__(self) -> None:
        # Kept, as an end's own: a teardown holds the GIL for up to a second.
        self.engine, self.session = start_engine(load_mooncake()[0], "127.0.0.1", "tcp")
        self.refuse_write: int | None = None  # this submission (0-based) is refused
        self.fail: set[int] = set()  # these batches report failure once the engine is done
        self.hold = 0.0  # seconds each batch reports pending after it was submitted
        self.submitted: list[int] = []
        self.resolved: list[int] = []
        self.checks = 0
        self._at: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def batch_transfer_async_write(self, *args: Any) -> int:
        # This engine's transfer_check_status looks at a batch's first transfer only.
        assert len(args[1]) == 1, "a batch of more than one transfer cannot be waited for"
        if len(self.submitted) == self.refuse_write:
            self.submitted.append(0)
            return 0
        batch = int(self.engine.batch_transfer_async_write(*args))
        self.submitted.append(batch)
        self._at[batch] = time.monotonic()
        return batch

    def transfer_check_status(self, batch: int) -> int:
        self.checks += 1
        if time.monotonic() - self._at[batch] < self.hold:
            return 0
        status = int(self.engine.transfer_check_status(batch))
        if status in (1, -1):
            self.resolved.append(batch)
            if batch in self.fail:
                return -1
        return status


@pytest.fixture
def scripted() -> Iterator[tuple[ResumableReceiver, EmbeddingSender, ScriptedEngine, BlockBuffers]]:
    if MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1":
        pytest.skip(MISSING)
    bufs = buffers()
    engine = ScriptedEngine()
    a, b = endpoint(), endpoint()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=5.0)
    end_s = MooncakeTransport(
        "sender", listen=b, peer=a, engine=engine, session=engine.session, timeout=5.0
    )
    receiver = ResumableReceiver(bufs, end_r, 24, max_resume_tokens=40)
    yield receiver, EmbeddingSender(end_s), engine, bufs
    for end in (end_s, end_r):
        end.close(wait=5.0)


@needs_mooncake
def test_a_piece_the_engine_will_not_start_fails_that_request_after_the_rest_landed(
    scripted: tuple[ResumableReceiver, EmbeddingSender, ScriptedEngine, BlockBuffers],
) -> None:
    receiver, sender, engine, bufs = scripted
    engine.refuse_write = 2  # round 0: embeddings and fill ids start, the first mRoPE row not
    receiver.add("a")
    sender.add("a", random_source(100, 4, seed=1))
    run(receiver, sender, "a", 20.0)
    result = receiver.take("a")
    assert result.state is TransferState.Failed
    assert result.reason == "sender error: the transfer engine refused to start the round's write"
    # The status went out only after both started writes were done.
    assert engine.submitted[2] == 0 and sorted(engine.resolved) == sorted(engine.submitted[:2])
    assert bufs.allocator.num_free_blocks == bufs.num_blocks
    # The engine and the transport go on: the next request lands intact.
    source = random_source(100, 4, seed=2)
    receiver.add("b")
    sender.add("b", source)
    run(receiver, sender, "b", 20.0)
    result = receiver.take("b")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(source)


@needs_mooncake
def test_a_write_the_engine_reports_failed_fails_that_request_only(
    scripted: tuple[ResumableReceiver, EmbeddingSender, ScriptedEngine, BlockBuffers],
) -> None:
    receiver, sender, engine, bufs = scripted
    receiver.add("a")
    sender.add("a", random_source(100, 4, seed=1))
    run(receiver, sender, "a", 20.0)
    assert receiver.take("a").state is TransferState.Success
    engine.fail = {-1}  # nothing yet; the next round's aux write fails
    original = engine.batch_transfer_async_write

    def failing_aux(*args: Any) -> int:
        batch = original(*args)
        if args[3] == [bufs.aux_size * 4]:
            engine.fail.add(batch)
        return batch

    engine.batch_transfer_async_write = failing_aux  # type: ignore[method-assign]
    receiver.add("b")
    sender.add("b", random_source(30, 4, seed=2))
    run(receiver, sender, "b", 20.0)
    result = receiver.take("b")
    assert result.state is TransferState.Failed
    assert result.reason == "sender error: the transfer engine failed to write the round"
    assert bufs.allocator.num_free_blocks == bufs.num_blocks


# -- sources registered with an engine several ends share --------------------------------


class KeyedEngine:
    """A real engine that, as over RDMA (a write needs the source's local key), refuses
    to start a write from memory nobody registered with it; it keeps what is registered."""

    def __init__(self) -> None:
        # Kept, as an end's own: a teardown holds the GIL for up to a second.
        self.engine, self.session = start_engine(load_mooncake()[0], "127.0.0.1", "tcp")
        self.regions: dict[int, int] = {}  # address -> bytes
        self.unkeyed: list[int] = []  # writes refused: their sources
        self.sessions: list[str] = []  # where each write went

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def register_memory(self, address: int, nbytes: int) -> int:
        rc = int(self.engine.register_memory(address, nbytes))  # refuses an overlap
        if rc == 0:
            self.regions[address] = nbytes
        return rc

    def unregister_memory(self, address: int) -> int:
        self.regions.pop(address, None)
        return int(self.engine.unregister_memory(address))

    def own(self, tensors: EmbeddingTensors) -> list[int]:
        """Register ``tensors`` as their owner would (an encoder's output pool)."""
        addresses = []
        for t in (tensors.embeddings, tensors.fill_ids, tensors.mrope):
            assert self.register_memory(t.data_ptr(), t.numel() * t.element_size()) == 0
            addresses.append(t.data_ptr())
        return addresses

    def batch_transfer_async_write(
        self, session: str, sources: list[int], targets: list[int], lengths: list[int]
    ) -> int:
        self.sessions.append(session)
        for at, n in zip(sources, lengths, strict=True):
            if not any(r <= at and at + n <= r + k for r, k in self.regions.items()):
                self.unkeyed.append(at)
                return 0
        return int(self.engine.batch_transfer_async_write(session, sources, targets, lengths))


@dataclass
class Line:
    """One language-side peer of the encoder: its receiver, and the encoder's end to it."""

    receiver: ResumableReceiver
    sender: EmbeddingSender
    ends: tuple[MooncakeReceiverEnd, MooncakeSenderEnd]

    def until_sent(self, rid: str, tokens: int) -> None:
        deadline = time.monotonic() + 20.0
        while self.receiver.record(rid).sent < tokens and time.monotonic() < deadline:
            self.receiver.step()
            self.sender.step()
            time.sleep(0.001)
        assert self.receiver.record(rid).sent >= tokens


@pytest.fixture
def shared() -> Iterator[tuple[KeyedEngine, Line, Line]]:
    """Two peers; the encoder's two ends share its one engine, as the README advises."""
    if MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1":
        pytest.skip(MISSING)
    engine = KeyedEngine()
    lines = []
    for _ in range(2):
        bufs, a, b = buffers(), endpoint(), endpoint()
        end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=5.0)
        end_s = MooncakeTransport(
            "sender", listen=b, peer=a, engine=engine, session=engine.session, timeout=5.0
        )
        assert isinstance(end_r, MooncakeReceiverEnd) and isinstance(end_s, MooncakeSenderEnd)
        receiver = ResumableReceiver(bufs, end_r, 24, max_resume_tokens=24)
        lines.append(Line(receiver, EmbeddingSender(end_s), (end_r, end_s)))
    yield engine, lines[0], lines[1]
    for line in lines:
        for end in reversed(line.ends):
            end.close(wait=5.0)


def _aux_rows(engine: KeyedEngine) -> dict[int, int]:
    return {a: n for a, n in engine.regions.items() if n == MAX_AUX * 4}  # each end's stage


@needs_mooncake
@pytest.mark.parametrize("how", ["its request ends", "its end closes"])
def test_a_storage_two_ends_write_from_stays_registered_until_both_are_done(
    shared: tuple[KeyedEngine, Line, Line], how: str
) -> None:
    engine, first, second = shared
    batch = random_source(200, 4, seed=11)  # one encoder batch: both requests' rows
    first.receiver.add("a")
    first.sender.add("a", batch.narrow(0, 60))
    second.receiver.add("b")
    second.sender.add("b", batch.narrow(60, 140))
    first.until_sent("a", 24)  # the first end registered the batch's storages
    second.until_sent("b", 24)  # the second writes from them too
    if how == "its request ends":
        run(first.receiver, first.sender, "a", 20.0)
        assert first.receiver.take("a").state is TransferState.Success
    else:
        first.ends[1].close(wait=5.0)
    run(second.receiver, second.sender, "b", 20.0)  # 116 tokens to go, in five rounds
    result = second.receiver.take("b")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(batch.narrow(60, 140))
    assert engine.unkeyed == []
    if how == "its request ends":  # both requests are over: only the ends' aux rows stay
        assert engine.regions == _aux_rows(engine) and len(engine.regions) == 2


@needs_mooncake
def test_a_source_its_owner_stopped_registering_is_registered_when_next_written(
    shared: tuple[KeyedEngine, Line, Line],
) -> None:
    engine, line, _ = shared
    source = random_source(100, 4, seed=12)
    owned = engine.own(source)  # the engine refuses to register it again: written as it is
    line.receiver.add("a")
    line.sender.add("a", source)
    run(line.receiver, line.sender, "a", 20.0)
    assert line.receiver.take("a").state is TransferState.Success
    assert all(a in engine.regions for a in owned)
    for address in owned:  # the owner lets it go; the tensors live on
        engine.unregister_memory(address)
    line.receiver.add("b")
    line.sender.add("b", source)
    run(line.receiver, line.sender, "b", 20.0)
    result = line.receiver.take("b")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(source)
    assert engine.unkeyed == []
    assert engine.regions == _aux_rows(engine)  # and unregistered when "b" ended


@needs_mooncake
@pytest.mark.parametrize(
    ("hidden", "dtype", "why"),
    [
        (4, torch.float16, "float16 x 4; the receiver's blocks hold bfloat16 x 4"),
        (8, torch.bfloat16, "bfloat16 x 8; the receiver's blocks hold bfloat16 x 4"),
        (2, torch.float32, "float32 x 2; the receiver's blocks hold bfloat16 x 4"),
    ],
)
def test_a_source_that_is_not_what_the_blocks_hold_fails_its_request_unwritten(
    shared: tuple[KeyedEngine, Line, Line], hidden: int, dtype: torch.dtype, why: str
) -> None:
    """As bytes, a float16 source reads as bfloat16 garbage; a wider one spills into the
    next blocks, another request's (both happened before the hello said what blocks hold)."""
    engine, line, _ = shared
    wrong = random_source(30, hidden, seed=14)
    wrong = EmbeddingTensors(wrong.embeddings.to(dtype), wrong.fill_ids, wrong.mrope)
    line.receiver.add("wrong")
    line.sender.add("wrong", wrong)
    run(line.receiver, line.sender, "wrong", 10.0)
    result = line.receiver.take("wrong")
    assert result.state is TransferState.Failed
    assert result.reason == (
        f"sender error: round 0 could not be written: the source's embeddings are {why}"
    )
    assert engine.sessions == []  # nothing was written
    right = random_source(30, 4, seed=15)
    line.receiver.add("right")
    line.sender.add("right", right)
    run(line.receiver, line.sender, "right", 10.0)
    result = line.receiver.take("right")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(right)
    assert line.receiver.buffers.allocator.num_free_blocks == line.receiver.buffers.num_blocks


@needs_mooncake
def test_a_sender_that_writes_to_another_receiver_is_refused_before_its_statuses() -> None:
    """Crossed endpoints: the second pair's sender sends its statuses to the first
    receiver. With the same request ids its keys match the first receiver's rounds
    while its bytes land in the other's blocks. Only round 0's aux row was checked, and
    a stale row of the same total (seeded here) let its round 0 be taken as landed: a
    round of garbage copied out, before the first pair's silence lost the peer."""
    at = [endpoint() for _ in range(4)]  # receiver 1, sender 1, receiver 2, sender 2
    first, second = buffers(), buffers()
    first.aux[:, 0] = 100  # rows an earlier request of the same length left behind
    ends = [
        MooncakeTransport("receiver", listen=at[0], peer=at[1], buffers=first, timeout=5.0),
        MooncakeTransport("sender", listen=at[1], peer=at[0], timeout=5.0),
        MooncakeTransport("receiver", listen=at[2], peer=at[3], buffers=second, timeout=5.0),
        MooncakeTransport("sender", listen=at[3], peer=at[0], timeout=5.0),  # misconfigured
    ]
    try:
        receivers = [
            ResumableReceiver(b, e, 24, max_resume_tokens=40)
            for b, e in ((first, ends[0]), (second, ends[2]))
        ]
        senders = [EmbeddingSender(ends[1]), EmbeddingSender(ends[3])]
        for receiver in receivers:
            receiver.add("x")
        senders[1].add("x", random_source(100, 4, seed=17))  # the first pair's never comes
        deadline = time.monotonic() + 10.0
        while not receivers[0].poll("x").terminal and time.monotonic() < deadline:
            for driver in (*receivers, *senders):
                driver.step()
            time.sleep(0.001)
        result = receivers[0].take("x")
        assert result.state is TransferState.Failed
        assert result.reason is not None and result.reason.startswith(
            f"peer lost: a sender that writes to {ends[2].session} reached this end"
        )
        assert first.allocator.num_free_blocks == first.num_blocks
    finally:
        for end in reversed(ends):
            end.close(wait=5.0)


@needs_mooncake
def test_block_buffers_registered_already_are_refused_and_nothing_is_kept() -> None:
    engine = KeyedEngine()
    bufs = buffers()
    owner = bufs.fill_ids  # the owner registered part of the pool (the embeddings go first)
    assert engine.register_memory(owner.data_ptr(), owner.numel() * owner.element_size()) == 0
    listen = endpoint()
    with pytest.raises(TransportError, match="registers them itself"):
        MooncakeTransport(
            "receiver",
            listen=listen,
            peer=endpoint(),
            buffers=bufs,
            engine=engine,
            session=engine.session,
        )
    assert list(engine.regions) == [owner.data_ptr()]  # the embeddings' registration undone
    engine.unregister_memory(owner.data_ptr())  # the owner lets it go: the same pool and
    end = MooncakeTransport(  # endpoint serve an end
        "receiver",
        listen=listen,
        peer=endpoint(),
        buffers=bufs,
        engine=engine,
        session=engine.session,
        timeout=5.0,
    )
    assert len(engine.regions) == 4  # embeddings, fill ids, mRoPE rows, aux rows
    end.close(wait=5.0)
    assert engine.regions == {}


@needs_mooncake
def test_a_second_receiver_saying_hello_to_a_paired_sender_end_ends_it_before_a_write() -> None:
    engine = KeyedEngine()
    at_s, at_a, at_b = endpoint(), endpoint(), endpoint()
    end_s = MooncakeTransport(
        "sender", listen=at_s, peer=at_a, engine=engine, session=engine.session, timeout=5.0
    )
    bufs = buffers()
    end_a = MooncakeTransport("receiver", listen=at_a, peer=at_s, buffers=bufs, timeout=5.0)
    assert isinstance(end_a, MooncakeReceiverEnd) and isinstance(end_s, MooncakeSenderEnd)
    line = Line(
        ResumableReceiver(bufs, end_a, 24, max_resume_tokens=24),
        EmbeddingSender(end_s),
        (end_a, end_s),
    )
    line.receiver.add("a")
    line.sender.add("a", random_source(100, 4, seed=13))
    line.until_sent("a", 24)
    # Misconfigured: a second language-side instance names the same encoder end.
    end_b = MooncakeTransport("receiver", listen=at_b, peer=at_s, buffers=buffers(), timeout=5.0)
    try:
        time.sleep(0.5)  # its hello reaches the sender end before "a" posts its next round
        started = time.monotonic()
        run(line.receiver, line.sender, "a", 10.0)
        result = line.receiver.take("a")
        assert result.state is TransferState.Failed
        assert result.reason is not None and result.reason.startswith("peer lost: connection lost")
        assert time.monotonic() - started < 2.5  # the disconnect, not the 5 s timeout
        assert end_s.peer_lost is not None
        assert f"a receiver at {end_b.session} said hello to this end" in end_s.peer_lost
        assert set(engine.sessions) == {end_a.session}  # nothing went to the second one
        assert bufs.allocator.num_free_blocks == bufs.num_blocks
    finally:
        for end in (end_b, end_a, end_s):
            end.close(wait=5.0)


@needs_mooncake
def test_the_writer_sleeps_while_a_write_is_in_flight(
    scripted: tuple[ResumableReceiver, EmbeddingSender, ScriptedEngine, BlockBuffers],
) -> None:
    receiver, sender, engine, _ = scripted
    engine.hold = 0.3  # every batch looks pending for 0.3 s
    source = random_source(20, 4, seed=3)  # one round: six pieces
    receiver.add("a")
    sender.add("a", source)
    started = time.monotonic()
    run(receiver, sender, "a", 20.0)
    took = time.monotonic() - started
    result = receiver.take("a")
    assert result.state is TransferState.Success, result.reason
    assert result.output is not None and result.output.equal(source)
    assert took >= 0.3
    # Each look but the last is followed by a sleep of at least 0.1 ms: a spinning
    # wait would look millions of times in the same time.
    assert engine.checks <= took / 1e-4 + len(engine.submitted)


@needs_mooncake
def test_an_engine_that_does_not_answer_loses_the_peer_and_the_writer_slows_down() -> None:
    bufs = buffers()
    engine = ScriptedEngine()
    engine.hold = 1.5  # longer than either end's timeout
    a, b = endpoint(), endpoint()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=0.5)
    end_s = MooncakeTransport(
        "sender", listen=b, peer=a, engine=engine, session=engine.session, timeout=0.5
    )
    try:
        receiver = ResumableReceiver(bufs, end_r, 24)
        sender = EmbeddingSender(end_s)
        receiver.add("a")
        sender.add("a", random_source(20, 4, seed=4))
        run(receiver, sender, "a", 10.0)
        result = receiver.take("a")
        assert result.state is TransferState.Failed
        assert result.reason is not None and result.reason.startswith("peer lost")
        deadline = time.monotonic() + 10.0
        while len(engine.resolved) < len(engine.submitted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(engine.resolved) == len(engine.submitted) == 6
        # At most one look per 0.1 ms for the first 0.5 s, then one per 10 ms.
        assert engine.checks <= 0.5 / 1e-4 + (engine.hold - 0.5) / 1e-2 + 6
    finally:
        for end in (end_s, end_r):
            end.close(wait=5.0)


# -- what a peer may send ------------------------------------------------------------------


@dataclass
class Forged:
    """A live pair: the receiver has "victim" (whose source never comes, so its round 0
    stays posted) and "other" in flight; what the receiver end delivered; thread deaths;
    and a third connection into each end's control socket, for bytes of the test's own."""

    receiver: ResumableReceiver
    sender: EmbeddingSender
    bufs: BlockBuffers
    seen: list[Any]
    died: list[BaseException]
    pushes: dict[str, Any]

    def to_receiver(self, message: dict[str, Any] | bytes) -> None:
        self._send("receiver", message)

    def to_sender(self, message: dict[str, Any] | bytes) -> None:
        self._send("sender", message)

    def _send(self, end: str, message: dict[str, Any] | bytes) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.pushes[end].send(raw)


@pytest.fixture
def forged(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Forged]:
    end_r, end_s, bufs = pair
    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(a.exc_value))
    seen: list[Any] = []
    poll = end_r.poll_statuses

    def spy() -> Any:
        out = poll()
        seen.extend(out)
        return out

    end_r.poll_statuses = spy  # type: ignore[method-assign]
    _, zmq = load_mooncake()
    context = zmq.Context()
    pushes = {}
    for name, end in (("receiver", end_r), ("sender", end_s)):
        pushes[name] = context.socket(zmq.PUSH)
        pushes[name].connect(end.listen)
    receiver = ResumableReceiver(bufs, end_r, 24, max_resume_tokens=40)
    receiver.add("victim")
    receiver.add("other")
    receiver.step()  # both round 0s posted
    deadline = time.monotonic() + 5.0  # the sender's hi came: a status is taken from here on
    while not end_r._greeted and time.monotonic() < deadline:
        time.sleep(0.001)
    assert end_r._greeted
    yield Forged(receiver, EmbeddingSender(end_s), bufs, seen, died, pushes)
    for push in pushes.values():
        push.close(0)
    context.term()


def settle(receiver: ResumableReceiver, sender: EmbeddingSender, limit: float = 20.0) -> None:
    """Step both until every request ended and no round is quarantined."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        receiver.step()
        sender.step()
        done = all(receiver.poll(r).terminal for r in ("victim", "other"))
        if done and not receiver.quarantined():
            return
        time.sleep(0.001)
    raise AssertionError("did not settle")


@needs_mooncake
@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"tokens": 2.7}, "tokens and total must be ints"),
        ({"tokens": "8"}, "tokens and total must be ints"),
        ({"total": 1e999}, "tokens and total must be ints"),
        ({"final": "no"}, "final must be a bool"),
    ],
)
def test_a_status_with_a_bad_body_fails_only_the_request_it_names(
    forged: Forged, body: dict[str, Any], problem: str
) -> None:
    receiver, sender = forged.receiver, forged.sender
    landed = {"t": "landed", "rid": "victim", "inc": 1, "epoch": 0}
    forged.to_receiver({**landed, "tokens": 8, "total": 24, "final": False, **body})
    source = random_source(100, 4, seed=5)
    sender.add("other", source)
    settle(receiver, sender)  # the victim's round comes back from quarantine: cancelled
    victim, other = receiver.take("victim"), receiver.take("other")
    assert victim.state is TransferState.Failed
    assert victim.reason == f"protocol error: malformed status ({problem})"
    assert other.state is TransferState.Success, other.reason
    assert other.output is not None and other.output.equal(source)
    assert receiver.peer_lost is None and not forged.died
    assert forged.bufs.allocator.num_free_blocks == forged.bufs.num_blocks


@needs_mooncake
@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"[" * 100_000, "not JSON (RecursionError)"),
        (b"\xff\xfe", "not JSON (JSONDecodeError)"),
        (b'{"t":"landed","rid":["victim"],"inc":1,"epoch":0}', "rid must be an int64 or a str"),
        (b'{"t":"landed","rid":"victim","inc":true,"epoch":0}', "inc and epoch must be ints"),
        (b'{"t":"what"}', "unknown message 'what'"),
    ],
)
def test_a_message_that_cannot_be_read_loses_the_peer_and_nothing_raises(
    forged: Forged, raw: bytes, why: str
) -> None:
    receiver = forged.receiver
    forged.to_receiver(raw)
    settle(receiver, forged.sender)
    lost = [s for s in forged.seen if isinstance(s, PeerLost)]
    assert len(lost) == 1 and lost[0].reason.startswith("malformed control message: ")
    assert why in lost[0].reason
    for rid in ("victim", "other"):
        result = receiver.take(rid)
        assert result.state is TransferState.Failed
        assert result.reason == f"peer lost: {lost[0].reason}"
    assert not forged.died  # the control thread ended by reporting, not by an exception
    assert forged.bufs.allocator.num_free_blocks == forged.bufs.num_blocks


@needs_mooncake
@pytest.mark.parametrize(
    "dst",
    [[[1, 2, 3]], [[1, 2, 3, 4, 5, "6"]], "nowhere"],
)
def test_a_post_with_unusable_addresses_refuses_only_its_request(forged: Forged, dst: Any) -> None:
    receiver, sender = forged.receiver, forged.sender
    sender.add("stranger", random_source(8, 4, seed=6))
    forged.to_sender(
        {
            "t": "post",
            "rid": "stranger",
            "inc": 1,
            "epoch": 0,
            "sent": 0,
            "cap": 8,
            "expect": None,
            "blocks": [0],
            "dst": dst,
        }
    )
    source = random_source(100, 4, seed=7)
    sender.add("other", source)
    deadline = time.monotonic() + 20.0
    while "stranger" in sender and time.monotonic() < deadline:
        receiver.step()
        sender.step()
        time.sleep(0.001)
    sender.add("victim", random_source(8, 4, seed=8))
    settle(receiver, sender)
    refusals = [s for s in forged.seen if getattr(s, "rid", None) == "stranger"]
    assert len(refusals) == 1 and isinstance(refusals[0], SenderError)
    assert refusals[0].reason.startswith("round 0 could not be written: round 0 cannot be written")
    assert receiver.orphan_statuses == 1  # no life of the receiver's: nothing else changes
    other = receiver.take("other")
    assert other.state is TransferState.Success, other.reason
    assert other.output is not None and other.output.equal(source)
    assert receiver.take("victim").state is TransferState.Success
    assert sender.malformed_posts == 0 and not forged.died
    assert forged.bufs.allocator.num_free_blocks == forged.bufs.num_blocks


@needs_mooncake
def test_a_control_thread_that_fails_loses_the_peer_instead_of_dying_unheard(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers], forged: Forged
) -> None:
    def broken(m: dict[str, Any]) -> bool:
        raise RuntimeError("a bug")

    pair[0]._on_message = broken  # type: ignore[method-assign]
    forged.sender.add("other", random_source(20, 4, seed=9))  # its status meets the bug
    settle(forged.receiver, forged.sender)
    lost = [s for s in forged.seen if isinstance(s, PeerLost)]
    assert [s.reason for s in lost] == ["the control thread failed: RuntimeError('a bug')"]
    assert forged.receiver.poll("other") is TransferState.Failed and not forged.died
    assert forged.bufs.allocator.num_free_blocks == forged.bufs.num_blocks


@needs_mooncake
def test_a_writer_whose_engine_raises_ends_the_link_at_once(
    scripted: tuple[ResumableReceiver, EmbeddingSender, ScriptedEngine, BlockBuffers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver, sender, engine, bufs = scripted
    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(a.exc_value))

    def broken(batch: int) -> int:
        raise RuntimeError("engine bug")

    engine.transfer_check_status = broken  # type: ignore[method-assign]
    receiver.add("a")
    sender.add("a", random_source(20, 4, seed=10))
    started = time.monotonic()
    run(receiver, sender, "a", 20.0)
    result = receiver.take("a")
    assert result.state is TransferState.Failed
    assert result.reason is not None and result.reason.startswith("peer lost: connection lost")
    assert time.monotonic() - started < 3.0  # the disconnect, not the 5 s timeout
    end: Any = sender.transport
    deadline = time.monotonic() + 5.0
    while end.peer_lost is None and time.monotonic() < deadline:
        sender.step()
        time.sleep(0.01)
    assert end.peer_lost == "the writer thread failed: RuntimeError('engine bug')"
    assert not died
    assert bufs.allocator.num_free_blocks == bufs.num_blocks


@needs_mooncake
def test_a_round_posted_for_a_source_that_never_came_is_dropped_with_its_life(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers],
) -> None:
    end_r, end_s, bufs = pair
    receiver = ResumableReceiver(bufs, end_r, 24, max_resume_tokens=40)
    sender = EmbeddingSender(end_s)
    for i in range(3):  # the client goes away before the encoder finishes, three times
        receiver.add(f"gone-{i}")
    deadline = time.monotonic() + 10.0
    while end_s.pending_posts < 3 and time.monotonic() < deadline:
        receiver.step()
        sender.step()
        time.sleep(0.001)
    assert end_s.pending_posts == 3
    for i in range(3):
        receiver.abort(f"gone-{i}")
    source = random_source(60, 4, seed=11)
    receiver.add("kept")
    sender.add("kept", source)
    deadline = time.monotonic() + 20.0
    while (receiver.quarantined() or not receiver.poll("kept").terminal) and (
        time.monotonic() < deadline
    ):
        receiver.step()
        sender.step()
        time.sleep(0.001)
    assert receiver.take("kept").output.equal(source)  # type: ignore[union-attr]
    assert end_s.pending_posts == 0  # nothing is kept for the lives that ended
    assert bufs.allocator.num_free_blocks == bufs.num_blocks


@needs_mooncake
def test_a_message_too_big_for_a_status_loses_the_peer_unread(forged: Forged) -> None:
    forged.to_receiver(b'{"t":"landed","rid":"' + b"x" * MAX_STATUS_BYTES + b'"}')
    settle(forged.receiver, forged.sender)
    lost = [s for s in forged.seen if isinstance(s, PeerLost)]
    assert [s.reason for s in lost] == ["connection lost: the peer disconnected"]
    assert forged.receiver.poll("victim") is TransferState.Failed and not forged.died
    assert forged.bufs.allocator.num_free_blocks == forged.bufs.num_blocks


def test_the_longest_status_fits_the_limit() -> None:
    worst = {
        "t": "error",
        "rid": "\U0001f600" * MAX_RID_CHARS,  # escaped to 12 bytes a character
        "inc": 2**63,
        "epoch": 2**63,
        "reason": "\U0001f600" * (MAX_REASON_BYTES // 4),
    }
    assert len(json.dumps(worst, separators=(",", ":")).encode()) < MAX_STATUS_BYTES // 16


@needs_mooncake
def test_a_last_round_that_landed_before_the_link_dropped_succeeds(
    pair: tuple[MooncakeReceiverEnd, MooncakeSenderEnd, BlockBuffers],
) -> None:
    end_r, end_s, bufs = pair
    receiver = ResumableReceiver(bufs, end_r, 24)
    sender = EmbeddingSender(end_s)
    source = random_source(20, 4, seed=12)
    receiver.add("a")
    receiver.step()
    sender.add("a", source)
    deadline = time.monotonic() + 10.0
    while not end_r._inbox and time.monotonic() < deadline:
        sender.step()  # the round is written and its status sent; the receiver does not look
        time.sleep(0.001)
    end_s.close(wait=5.0)  # then the sender goes away
    while len(end_r._inbox) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [type(item).__name__ for item in end_r._inbox] == ["Arrived", "Lost"]
    while receiver.peer_lost is None and time.monotonic() < deadline:
        receiver.step()  # the status first, then the loss
        end_r.wait(0.05)
    result = receiver.take("a")
    assert result.state is TransferState.Success, result.reason  # all its bytes were in
    assert result.output is not None and result.output.equal(source)
    assert receiver.peer_lost == "connection lost: the peer disconnected"
    assert bufs.allocator.num_free_blocks == bufs.num_blocks


@needs_mooncake
def test_losing_the_peer_never_blocks_the_event_loop() -> None:
    """The hello to a peer that never came cannot be delivered: the loss must not wait
    for it (it used to wait out the linger, the timeout, inside poll_statuses)."""
    end = MooncakeTransport(
        "receiver", listen=endpoint(), peer=endpoint(), buffers=buffers(), timeout=2.0
    )
    start = time.monotonic()
    longest = 0.0
    statuses: list[Any] = []
    while not statuses and time.monotonic() - start < 10:
        polled = time.monotonic()
        statuses = list(end.poll_statuses())
        longest = max(longest, time.monotonic() - polled)
        end.wait(0.05)
    assert [type(s) for s in statuses] == [PeerLost]
    assert 2.0 <= time.monotonic() - start < 3.5
    assert longest < 0.5


@needs_mooncake
def test_an_ends_own_engine_outlives_the_end_and_refuses_what_comes_late() -> None:
    # Torn down when the end was collected, it held the GIL for up to a second, in
    # whichever thread collected it: a posted round elsewhere in the process made no
    # progress, and its peer counted as lost.
    bufs = buffers()
    end = MooncakeTransport("receiver", listen=endpoint(), peer=endpoint(), buffers=bufs)
    host, port = end.session.rsplit(":", 1)
    end.close(wait=5.0)
    del end
    gc.collect()
    with socket.create_connection((host, int(port)), timeout=5.0):
        pass  # its handshake still listens: the engine was not torn down
    late, _ = start_engine(load_mooncake()[0], "127.0.0.1", "tcp")  # kept, as the end's
    source = torch.full((32,), 7, dtype=torch.uint8)
    assert late.register_memory(source.data_ptr(), 32) == 0
    target = bufs.embeddings.data_ptr()
    assert late.transfer_sync_write(f"{host}:{port}", source.data_ptr(), target, 32) != 0
    assert not bufs.embeddings.any()  # nothing is registered there any more
    late.unregister_memory(source.data_ptr())


@needs_mooncake
def test_an_end_closed_before_its_threads_left_is_collected_without_blocking() -> None:
    gc.collect()  # what earlier tests left
    started = time.monotonic()
    gc.collect()  # what a full collection of this process costs with nothing to free
    baseline = time.monotonic() - started
    end = MooncakeTransport(
        "receiver", listen=endpoint(), peer=endpoint(), buffers=buffers(), timeout=3.0
    )
    context = end._context
    end.close(wait=0.0)  # its threads are still in their loops; its hello lingers
    deadline = time.monotonic() + 2.0
    while end._threads_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not end._threads_alive()
    del end
    started = time.monotonic()
    gc.collect()  # pyzmq ends a context it collects, waiting out the linger (3 s)
    assert time.monotonic() - started < baseline + 1.0
    deadline = time.monotonic() + 5.0  # the last thread out ended it, in the background
    while not context.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert context.closed
