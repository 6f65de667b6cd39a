"""The connector's producer rank apart from vLLM: its serving threads answer posts while the
engine is busy (the encoder's forward pass holds vLLM's step), and a thread's failure
reaches the engine instead of dying quietly."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import pytest
import torch

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    EmbeddingSender,
    ResumableReceiver,
    TransferState,
    TransportError,
    TransportUnavailableError,
)
from resumekit.integrations.vllm.book import ProducerBook
from resumekit.integrations.vllm.orders import Orders, RankReport
from resumekit.integrations.vllm.rank import ProducerRank
from resumekit.integrations.vllm.wiring import forget_link, inprocess_link
from resumekit.transports.mooncake import MooncakeTransport, load_mooncake

try:
    load_mooncake()
    MISSING = None
except TransportUnavailableError as error:
    MISSING = str(error)


def endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_a_producer_rank_serves_posts_while_the_engine_never_steps() -> None:
    if MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1":
        pytest.skip(MISSING)
    bufs = BlockBuffers(BlockAllocator(8, 16), 32, dtype=torch.float16, device="cpu")
    a, b = endpoint(), endpoint()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=10.0)
    end_s = MooncakeTransport("sender", listen=b, peer=a, timeout=10.0)
    producer = ProducerRank(0, [EmbeddingSender(end_s)], serve=True)
    try:
        receiver = ResumableReceiver(bufs, end_r, 32, max_resume_tokens=48)
        item = torch.randn(1000, 32).to(torch.float16)  # 1000 tokens through a 128-token pool
        receiver.add("t1")
        producer.apply(Orders(send=[("img", "t1")]), {"img": item})
        # From here on the engine's side is silent: no apply, pump or report.
        deadline = time.monotonic() + 30.0
        while not receiver.poll("t1").terminal and time.monotonic() < deadline:
            receiver.step()
            time.sleep(0.0005)
        result = receiver.take("t1")
        assert result.state is TransferState.Success, result.reason
        assert result.rounds >= 21  # 32 tokens, then 48 a round
        assert result.output is not None and torch.equal(result.output.embeddings, item)
        deadline = time.monotonic() + 10.0
        while producer.held() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert producer.held() == 0  # the last round landed: the source is let go
        report = producer.report()
        assert report is not None and report.sources == 0 and not report.busy
    finally:
        producer.close()
        for end in (end_s, end_r):
            end.close(wait=5.0)
    assert not any(t.name.startswith("resumekit-producer") for t in threading.enumerate())


def test_a_link_that_ends_drops_its_sender_and_what_it_held() -> None:
    if MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") != "1":
        pytest.skip(MISSING)
    bufs = BlockBuffers(BlockAllocator(8, 16), 32, dtype=torch.float16, device="cpu")
    a, b = endpoint(), endpoint()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=10.0)
    end_s = MooncakeTransport("sender", listen=b, peer=a, timeout=10.0)
    producer = ProducerRank(0, [EmbeddingSender(end_s)], serve=True)
    book = ProducerBook(served=True)
    try:
        cache = {"img": torch.randn(100, 32).to(torch.float16)}
        producer.apply(Orders(send=[("img", "t1")]), cache)  # no consumer asks for it yet
        assert producer.held() == 1
        report = producer.report()
        assert report is not None
        book.reported({0: report})
        assert book.sources == 1 and not book.pending()  # threads serve: vLLM need not step
        end_r.close(wait=5.0)  # the language side goes
        deadline = time.monotonic() + 10.0
        while producer.senders and time.monotonic() < deadline:
            time.sleep(0.001)
        assert producer.senders == [] and 0 in producer.ended
        assert producer.held() == 0
        producer.apply(Orders(send=[("img2", "t2")]), {"img2": cache["img"]})
        assert producer.held() == 0  # nothing is kept for a link that ended
        report = producer.report()
        assert report is not None and report.sources == 0
    finally:
        producer.close()
        end_s.close(wait=5.0)
    assert not any(t.name.startswith("resumekit-producer") for t in threading.enumerate())


def test_stepped_ranks_keep_vllm_stepping_while_they_hold_sources() -> None:
    book = ProducerBook()
    book.reported({0: RankReport(0, sources=2, busy=True)})
    assert book.pending()
    book.reported({0: RankReport(0, sources=0)})
    assert not book.pending()


def test_serving_from_threads_needs_a_transport_that_can_wait() -> None:
    link = inprocess_link("ranks-no-wait")
    try:
        with pytest.raises(TransportError, match="cannot wait"):
            ProducerRank(0, [EmbeddingSender(link.sender_end(0))], serve=True)
    finally:
        forget_link("ranks-no-wait")
    assert not any(t.name.startswith("resumekit-producer") for t in threading.enumerate())


class _Broken:
    """A sender end whose posts cannot be read."""

    finished = False
    peer_lost = None

    def wait(self, timeout: float) -> bool:
        return True

    def poll_posts(self) -> Sequence[Any]:
        raise OSError("the socket went away")

    def write_round(self, post: Any, data: Any, aux: Any) -> None:
        raise AssertionError("never reached")

    def report(self, status: Any) -> None:
        raise AssertionError("never reached")

    def check_request_id(self, rid: Hashable) -> None:
        pass


def test_a_failure_in_a_serving_thread_is_raised_by_the_engines_next_call() -> None:
    producer = ProducerRank(0, [EmbeddingSender(_Broken())], serve=True)
    try:
        failure: TransportError | None = None
        deadline = time.monotonic() + 10.0
        while failure is None and time.monotonic() < deadline:
            try:
                producer.report()
            except TransportError as error:
                failure = error
            time.sleep(0.001)
        assert failure is not None and "socket went away" in str(failure)
        with pytest.raises(TransportError, match="serving thread failed"):
            producer.apply(Orders(), {})
    finally:
        producer.close()
