"""TorchDistributedTransport's argument checks, idle wait and CUDA completion polling,
in this process (a one-rank gloo group where one is needed)."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from resumekit.allocator import BlockAllocator, BlockBuffers
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.properties.draws import forged_tensors
from resumekit.protocol import RoundPost
from resumekit.protocol.messages import Cancelled, Landed, PeerLost, SenderError
from resumekit.transports._threaded import Arrived, Lost
from resumekit.transports.torch import TorchDistributedTransport, TorchEnd
from resumekit.transports.torch.receiver import TorchReceiverEnd, _Round
from resumekit.transports.torch.sender import TorchSenderEnd
from resumekit.transports.torch.wire import layout, layout_mismatch

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bare(end: type[TorchEnd] = TorchReceiverEnd, **attrs: Any) -> Any:
    """An end with no threads or group: just the state the method under test reads."""
    t = object.__new__(end)
    defaults: dict[str, Any] = {
        "_inbox": deque(),
        "_wake": threading.Event(),
        "_lost_reason": None,
        "_threads": [],
        "closed": False,
        "timeout": 1.0,
    }
    for k, v in {**defaults, **attrs}.items():
        setattr(t, k, v)
    return t


def test_construction_rejects_bad_arguments(one_rank_group: None) -> None:
    buffers = BlockBuffers(BlockAllocator(4, 8), 16)
    threads = threading.active_count()
    with pytest.raises(InvalidArgumentError, match="match"):
        TorchDistributedTransport("receiver", 0, buffers=buffers, match="bytag")  # type: ignore[arg-type]
    fake_cuda = BlockBuffers(BlockAllocator(4, 8), 16)
    fake_cuda.device = torch.device("cuda", 0)
    with pytest.raises(InvalidArgumentError, match="NCCL data_group"):
        TorchDistributedTransport("receiver", 0, buffers=fake_cuda)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        TorchDistributedTransport("sender", 0, timeout=0)
    with pytest.raises(InvalidArgumentError, match="role"):
        TorchDistributedTransport("encoder", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="peer must be another rank of the 1"):
        TorchDistributedTransport("sender", 0)
    assert threading.active_count() == threads  # nothing was started


def test_transport_needs_an_initialised_group() -> None:
    with pytest.raises(TransportError, match="not initialised"):
        TorchDistributedTransport("sender", 1)


def test_wait_wakes_on_delivery_and_times_out_otherwise() -> None:
    t = _bare()
    start = time.monotonic()
    assert t.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    threading.Timer(0.05, t._deliver, args=(("status", None),)).start()
    start = time.monotonic()
    assert t.wait(10.0) is True
    assert time.monotonic() - start < 5.0
    assert t.wait(10.0) is True  # still undelivered to the loop: no wait at all
    t._inbox.clear()
    for bad in (-1, float("nan"), float("inf"), "1", None):
        with pytest.raises(InvalidArgumentError):
            t.wait(bad)  # type: ignore[arg-type]


def test_wait_while_losing_the_peer_waits_for_the_threads() -> None:
    worker = threading.Thread(target=time.sleep, args=(0.2,))
    worker.start()
    # Deliveries left over when the loss was noticed are dropped, not waited on.
    t = _bare(_lost_reason="connection lost", _threads=[worker], _inbox=deque([("status",)]))
    start = time.monotonic()
    assert t.wait(10.0) is True  # the thread ended: PeerLost can be reported now
    assert 0.1 <= time.monotonic() - start < 5.0 and not worker.is_alive()
    t.closed = True
    t._inbox.clear()
    start = time.monotonic()
    assert t.wait(0.05) is False  # closed: nothing more comes, but the loop still rests
    assert time.monotonic() - start >= 0.04


def test_statuses_that_came_before_the_loss_are_delivered_before_it() -> None:
    """A round whose payload landed before the link dropped is the receiver's; a status
    held for a payload still arriving goes with the peer."""
    landed = Landed(1, 0, 20, 20, True, incarnation=1)
    held = Landed(2, 0, 8, 30, False, incarnation=1)
    arriving = _Round(RoundPost(2, 0, (0,), 8, 0, incarnation=1), 0.0, arriving=True)
    t = _bare(
        _inbox=deque([Arrived((1, 1, 0), landed), Arrived((2, 1, 0), held), Lost("gone")]),
        _rounds={(2, 1, 0): arriving},
        _next_check=0.0,
        delivered=0,
        owns_group=False,
        peer_lost=None,
        _closing=False,
        _sends=queue.SimpleQueue(),
        _payloads=queue.SimpleQueue(),
    )
    assert t.poll_statuses() == [landed, PeerLost("gone")]
    assert t.delivered == 2 and t.peer_lost == "gone" and t._rounds == {}
    assert t.poll_statuses() == ()  # reported once


class _Work:
    """A CUDA-style work handle: completes after ``polls`` calls to ``is_completed``."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def is_completed(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def wait(self, timeout: Any = None) -> bool:  # NCCL's wait only orders streams
        raise AssertionError("a CUDA payload is waited for by polling, not wait()")


def test_cuda_completion_is_polled_within_the_timeout() -> None:
    t = _bare(timeout=0.2)
    t._wait(_Work(polls=5), cuda=True)
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"no progress for 0\.2 s"):
        t._wait(_Work(polls=10**9), cuda=True)
    assert 0.2 <= time.monotonic() - start < 2.0


def test_cuda_sources_need_an_nccl_data_group() -> None:
    t = _bare(TorchSenderEnd, _closing=False, _nccl=False)
    cuda = SimpleNamespace(shape=(4, 8), is_cuda=True, device=torch.device("cuda", 0))
    data = forged_tensors(cuda, None, None)  # what a CUDA source looks like to write_round
    post = RoundPost(0, 0, (0,), 8, 0, incarnation=1)
    with pytest.raises(InvalidArgumentError, match="NCCL data_group"):
        t.write_round(post, data, None)  # type: ignore[arg-type]


def test_sender_forgets_the_tags_of_rounds_it_will_never_write() -> None:
    sent: list[tuple[int, ...]] = []
    tags = {(1, 1, 0): 16, (1, 1, 1): 17, (2, 1, 0): 18}  # (rid, incarnation, epoch): tag
    t = _bare(TorchSenderEnd, _closing=False, _tags=tags)
    t._send_header = lambda tag, *values: sent.append(values)  # type: ignore[method-assign]
    t._send = lambda tensor, tag, group=None: None  # type: ignore[method-assign]
    t.report(Landed(1, 1, 8, 16, False, incarnation=1))  # written: write_round took its tag
    assert (1, 1, 1) in t._tags
    t.report(Cancelled(1, 0, incarnation=1))
    t.report(SenderError(2, 0, "round 0 offers 0 tokens", incarnation=1))
    assert t._tags == {(1, 1, 1): 17}
    assert [v[0] for v in sent] == [11, 12, 13]  # LANDED, CANCELLED, SENDER_ERROR


def test_the_role_picks_the_end() -> None:
    assert TorchReceiverEnd.role == "receiver" and TorchSenderEnd.role == "sender"
    for end, theirs in ((TorchSenderEnd, ("post_round", "cancel", "finish", "poll_statuses")),):
        assert not any(hasattr(end, call) for call in theirs)
    for call in ("poll_posts", "write_round", "report"):
        assert not hasattr(TorchReceiverEnd, call)
    with pytest.raises(InvalidArgumentError, match="role must be 'receiver' or 'sender'"):
        TorchDistributedTransport("both", 1)  # type: ignore[call-overload]
    with pytest.raises(InvalidArgumentError, match=r"the sender end .* takes none"):
        TorchDistributedTransport("sender", 1, buffers=BlockBuffers(BlockAllocator(4, 8), 16))  # type: ignore[call-overload]


def test_aux_size_is_accepted_checked_and_said_to_be_ignored() -> None:
    with pytest.raises(InvalidArgumentError, match="aux_size"):
        TorchDistributedTransport("sender", 1, aux_size=1)
    with (
        pytest.warns(DeprecationWarning, match="aux_size is ignored"),
        pytest.raises(TransportError, match="not initialised"),
    ):
        TorchDistributedTransport("sender", 1, aux_size=16)


LISTED = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", LISTED)
def test_a_layout_takes_a_source_of_its_hidden_size_and_dtype_only(dtype: torch.dtype) -> None:
    value = layout(3584, dtype)
    assert layout_mismatch(value, torch.empty(2, 3584, dtype=dtype)) is None
    name = str(dtype).removeprefix("torch.")
    for other in LISTED:
        if other is not dtype:
            found = layout_mismatch(value, torch.empty(2, 3584, dtype=other))
            assert found == (
                f"the source's embeddings are {str(other).removeprefix('torch.')} x 3584; "
                f"the receiver's blocks hold {name} x 3584"
            )
    assert layout_mismatch(value, torch.empty(2, 3583, dtype=dtype)) == (
        f"the source's embeddings are {name} x 3583; the receiver's blocks hold {name} x 3584"
    )
    assert layout_mismatch(layout(1 << 40, dtype), torch.empty(1, 1, dtype=dtype)) is not None


def test_a_dtype_the_layout_does_not_list_is_told_by_its_width() -> None:
    value = layout(8, torch.float8_e8m0fnu)  # not listed: travels as a 1-byte dtype
    assert layout_mismatch(value, torch.empty(1, 8, dtype=torch.float8_e8m0fnu)) is None
    assert layout_mismatch(value, torch.empty(1, 8, dtype=torch.float8_e4m3fn)) == (
        "the source's embeddings are float8_e4m3fn x 8; "
        "the receiver's blocks hold a 1-byte dtype x 8"
    )
    assert layout_mismatch(0, torch.empty(1, 8)) is not None  # no layout yet: nothing passes
