"""Nothing stuck, nothing silent over MooncakeTransport: a sender that refuses a hello
says why at once, and a send socket that fails loses the peer instead of its thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_mooncake import buffers, endpoint, needs_mooncake, run

from resumekit import (
    EmbeddingSender,
    ResumableReceiver,
    TransferState,
    TransportError,
)
from resumekit.sim.simulate import random_source
from resumekit.transports.mooncake import (
    HelloRefused,
    MooncakeReceiverEnd,
    MooncakeSenderEnd,
    MooncakeTransport,
    load_mooncake,
)
from resumekit.transports.mooncake._end import MooncakeEnd

TIMEOUT = 20.0  # generous: every verdict here must come well before it
PROMPT = TIMEOUT / 3


@pytest.fixture
def died(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """What any thread died of, unheard."""
    deaths: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: deaths.append(a.exc_value))
    return deaths


@pytest.fixture
def ends() -> Iterator[list[MooncakeEnd]]:
    """The ends a test makes, closed after it."""
    made: list[MooncakeEnd] = []
    yield made
    for end in reversed(made):
        end.close(wait=5.0)


def greeted(end: MooncakeReceiverEnd, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not end._greeted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert end._greeted


def until_lost(end: MooncakeSenderEnd, limit: float) -> None:
    deadline = time.monotonic() + limit
    while end.peer_lost is None and time.monotonic() < deadline:
        end.poll_posts()
        time.sleep(0.005)


@needs_mooncake
def test_a_second_receiver_is_refused_at_once_and_told_why(
    ends: list[MooncakeEnd], died: list[BaseException]
) -> None:
    at_s, at_a, at_b = endpoint(), endpoint(), endpoint()
    end_s = MooncakeTransport("sender", listen=at_s, peer=at_a, timeout=TIMEOUT)
    end_a = MooncakeTransport(
        "receiver", listen=at_a, peer=at_s, buffers=buffers(), timeout=TIMEOUT
    )
    ends += [end_s, end_a]
    greeted(end_a)  # the sender is paired with "a"
    bufs = buffers()
    started = time.monotonic()
    end_b = MooncakeTransport("receiver", listen=at_b, peer=at_s, buffers=bufs, timeout=TIMEOUT)
    ends.append(end_b)
    receiver = ResumableReceiver(bufs, end_b, 24)
    receiver.add("b")
    deadline = started + PROMPT
    while not receiver.poll("b").terminal and time.monotonic() < deadline:
        receiver.step()
        end_b.wait(0.05)
    took = time.monotonic() - started
    result = receiver.take("b")
    assert result.state is TransferState.Failed
    why = f"a receiver at {end_b.session} said hello to this end, which is paired with "
    assert result.reason is not None
    assert result.reason.startswith(f"peer lost: the sender refused this receiver's hello: {why}")
    assert took < PROMPT
    error = end_b.lost_error
    assert isinstance(error, HelloRefused) and isinstance(error, TransportError)
    assert error.reason.startswith(why) and str(error) == end_b.peer_lost
    assert bufs.allocator.num_free_blocks == bufs.num_blocks  # nothing holds its blocks
    until_lost(end_s, PROMPT)
    assert end_s.peer_lost is not None
    assert end_s.peer_lost.startswith(f"refused a receiver's hello: {why}")
    assert not died


@needs_mooncake
@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"v": 2}, "'hello': protocol version 2; this sender speaks 1"),
        ({"v": 2, "reply": None}, "'hello': protocol version 2; this sender speaks 1"),
        ({"hidden": "4"}, "'hello': hidden must be a positive int"),
    ],
    ids=["another-version", "another-version-without-reply", "malformed"],
)
def test_a_hello_the_sender_cannot_serve_fails_the_receivers_requests_at_once(
    ends: list[MooncakeEnd],
    died: list[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
    why: str,
) -> None:
    """Before, the sender only lost the link on its side and went on sending heartbeats:
    the receiver waited out a posted round's whole timeout ("made no progress")."""
    real = MooncakeEnd._send

    def send(self: MooncakeEnd, **message: Any) -> None:
        if message["t"] == "hello":
            message = {k: v for k, v in {**message, **change}.items() if v is not None}
        real(self, **message)

    monkeypatch.setattr(MooncakeReceiverEnd, "_send", send)
    a, b = endpoint(), endpoint()
    bufs = buffers()
    end_s = MooncakeTransport("sender", listen=b, peer=a, timeout=TIMEOUT)
    ends.append(end_s)
    started = time.monotonic()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=TIMEOUT)
    ends.append(end_r)
    receiver, sender = ResumableReceiver(bufs, end_r, 24), EmbeddingSender(end_s)
    receiver.add("a")
    sender.add("a", random_source(20, 4, seed=21))
    run(receiver, sender, "a", PROMPT)
    took = time.monotonic() - started
    result = receiver.take("a")
    assert result.state is TransferState.Failed
    assert result.reason == f"peer lost: the sender refused this receiver's hello: {why}"
    assert took < PROMPT
    error = end_r.lost_error
    assert isinstance(error, HelloRefused) and error.reason == why
    assert bufs.allocator.num_free_blocks == bufs.num_blocks
    until_lost(end_s, PROMPT)
    assert end_s.peer_lost == f"refused a receiver's hello: {why}"
    assert not died


@needs_mooncake
@pytest.mark.parametrize("role", ["sender", "receiver"])
def test_a_send_socket_that_fails_loses_the_peer_instead_of_its_thread(
    ends: list[MooncakeEnd],
    died: list[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    role: str,
) -> None:
    _, zmq = load_mooncake()
    a, b = endpoint(), endpoint()
    bufs = buffers()
    end_r = MooncakeTransport("receiver", listen=a, peer=b, buffers=bufs, timeout=TIMEOUT)
    end_s = MooncakeTransport("sender", listen=b, peer=a, timeout=TIMEOUT)
    ends += [end_s, end_r]
    greeted(end_r)
    broken = end_s if role == "sender" else end_r
    thread = broken._threads[0]
    assert thread.name == f"resumekit-{role}-send"
    real = zmq.Socket.send

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is thread:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zmq.Socket, "send", send)  # the next post, or the round's status
    receiver, sender = ResumableReceiver(bufs, end_r, 24), EmbeddingSender(end_s)
    started = time.monotonic()
    receiver.add("a")
    sender.add("a", random_source(20, 4, seed=22))
    run(receiver, sender, "a", PROMPT)
    result = receiver.take("a")
    assert result.state is TransferState.Failed
    assert time.monotonic() - started < PROMPT
    failed = f"the send thread failed: {zmq.ZMQError(zmq.EHOSTUNREACH)!r}"
    assert "Host unreachable" in failed  # the zmq message travels with the loss
    expected = failed if role == "receiver" else "connection lost: the peer disconnected"
    assert result.reason == f"peer lost: {expected}"
    assert bufs.allocator.num_free_blocks == bufs.num_blocks
    until_lost(end_s, PROMPT)
    if role == "sender":
        assert end_s.peer_lost == failed
    else:
        assert end_s.peer_lost is not None  # the receiver's link closed: the sender knows
    error = broken.lost_error
    assert type(error) is TransportError and str(error) == failed
    assert isinstance(error.__cause__, zmq.ZMQError)
    thread.join(5.0)
    assert not thread.is_alive()
    assert not died  # it ended by reporting, not by an exception
