"""The wider adversary, scenario by scenario: every output intact or failed with a reason,
nothing leaked, no request stuck, and no bad item ever touching another request."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from resumekit import InvalidArgumentError
from resumekit.allocator import EmbeddingTensors
from resumekit.properties.draws import bad_sources, forged_tensors
from resumekit.protocol import (
    EmbeddingSender,
    Landed,
    RoundPost,
    TransferState,
)
from resumekit.protocol.messages import Cancelled, PeerBack, PeerLost, SenderError
from resumekit.sim.simulate import random_source
from resumekit.transports.inprocess import Loopback

S = TransferState
BS = 128


def pair(pool_blocks: int = 256, **kw: object) -> Loopback:
    return Loopback(pool_blocks=pool_blocks, block_size=BS, hidden=8, **kw)  # type: ignore[arg-type]


def live(p: Loopback) -> list[Hashable]:
    return [rid for rid, rec in p.receiver._records.items() if not rec.state.terminal]


def run_until_done(p: Loopback, steps: int = 400) -> None:
    """Step until every request is terminal and nothing is in flight any more."""
    for _ in range(steps):
        if not live(p) and not p.transport.in_flight and not p.transport.posts:
            return
        p.step()
    raise AssertionError(f"still live after {steps} steps: {live(p)}")


def assert_clean(p: Loopback) -> None:
    p.receiver.check_quiescent()
    p.sender.check_quiescent()
    p.allocator.check_quiescent()


def take_ok(p: Loopback, rid: Hashable, source: EmbeddingTensors, mrope_delta: int = 0) -> None:
    result = p.receiver.take(rid)
    assert result.state is S.Success, result.reason
    assert result.output is not None and result.output.equal(source)
    assert result.total_tokens == source.num_tokens and result.mrope_delta == mrope_delta


# -- request ids used again --------------------------------------------------------------


def test_id_reused_after_take_with_an_old_status_still_delayed() -> None:
    """The old life's late duplicate must not end the new life with the old bytes."""
    p = pair()
    first = random_source(5_000, 8, seed=1)
    p.receiver.add("r")
    p.sender.add("r", first)
    p.receiver.step()
    p.sender.step()
    p.transport.duplicate(0)  # the old life's Landed arrives twice; one copy stays late
    [late] = p.transport.in_flight[1:]
    p.transport.in_flight = p.transport.in_flight[:1]
    run_until_done(p)
    take_ok(p, "r", first)

    second = random_source(5_000, 8, seed=2)  # same length: the old status would fit
    p.receiver.add("r")
    p.sender.add("r", second)
    p.receiver.step()  # round 0 of the new life posted, not yet written
    p.transport.inject(late)
    orphans = p.receiver.orphan_statuses
    p.receiver.step()
    assert p.receiver.orphan_statuses == orphans + 1
    assert p.receiver.poll("r") is S.Transferring
    run_until_done(p)
    take_ok(p, "r", second)
    assert_clean(p)


def test_id_reused_after_abort_while_its_round_is_in_flight() -> None:
    p = pair(pool_blocks=128)
    old = random_source(30_000, 8, seed=3)
    p.receiver.add("r")
    p.sender.add("r", old)
    p.receiver.step()  # round 0 in flight
    p.receiver.abort("r")
    p.receiver.take("r")
    assert p.receiver.quarantined()
    new = random_source(12_000, 8, seed=4)
    inc = p.receiver.add("r")
    # The encoder adds the new life's source before the sender has seen the cancel.
    assert p.sender.add("r", new, incarnation=inc)
    run_until_done(p)
    take_ok(p, "r", new)
    assert_clean(p)


def test_late_source_of_an_aborted_life_is_dropped_not_given_to_the_next() -> None:
    p = pair()
    p.receiver.add("r")  # life 1: its source never comes in time
    p.receiver.step()
    p.receiver.abort("r")
    p.receiver.take("r")
    new = random_source(3_000, 8, seed=5)
    inc = p.receiver.add("r")
    p.sender.add("r", new, incarnation=inc)
    p.sender.step()
    # The encoder finishes the aborted life only now: named, it is dropped.
    assert not p.sender.add("r", random_source(3_000, 8, seed=6), incarnation=inc - 1)
    run_until_done(p)
    take_ok(p, "r", new)
    assert_clean(p)


def test_sources_without_incarnations_bind_in_the_order_they_are_added() -> None:
    p = pair()
    p.receiver.add("r")
    p.receiver.step()
    p.receiver.abort("r")  # cancelled before its source came
    p.receiver.take("r")
    p.sender.step()
    assert not p.sender.add("r", random_source(2_000, 8, seed=7))  # its late source: dropped
    new = random_source(2_000, 8, seed=8)
    p.receiver.add("r")
    assert p.sender.add("r", new)
    run_until_done(p)
    take_ok(p, "r", new)
    assert_clean(p)


# -- refusals and landings for rounds never posted ---------------------------------------


@pytest.mark.parametrize("kind", ["cancelled", "error", "landed"])
@pytest.mark.parametrize("far", [False, True])
def test_status_for_a_round_never_posted_never_frees_the_round_in_flight(
    kind: str, far: bool
) -> None:
    p = pair(pool_blocks=128)
    victim, bystander = random_source(30_000, 8, seed=9), random_source(20_000, 8, seed=10)
    p.receiver.add("r")
    p.sender.add("r", victim)
    p.receiver.add("b")
    p.sender.add("b", bystander)
    p.receiver.step()  # both round 0s posted, not yet written
    rec = p.receiver.record("r")
    in_flight = rec.allocation
    assert in_flight is not None
    epoch, inc = rec.epoch + (10**6 if far else 1), rec.incarnation
    forged = {
        "cancelled": Cancelled("r", epoch, incarnation=inc),
        "error": SenderError("r", epoch, "forged", incarnation=inc),
        "landed": Landed("r", epoch, 1, 30_000, False, incarnation=inc),
    }[kind]
    p.transport.inject(forged)
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed and "protocol error" in (result.reason or "")
    # The sender may still write round 0: its blocks stay out of the pool until it lands.
    assert p.allocator.is_live(in_flight)
    assert list(p.receiver.quarantined()) == [("r", inc, 0)]
    run_until_done(p)
    take_ok(p, "b", bystander)
    assert_clean(p)


# -- malformed items in a batch ------------------------------------------------------------


def test_a_malformed_status_fails_only_its_own_request() -> None:
    p = pair()
    sources = {rid: random_source(9_000, 8, seed=i) for i, rid in enumerate("abc")}
    for rid, src in sources.items():
        p.receiver.add(rid)
        p.sender.add(rid, src)
    p.receiver.step()
    p.sender.step()  # three round 0s landed: their statuses are in flight
    garbled: object = "zero"
    inc = p.receiver.record("b").incarnation
    p.transport.in_flight.insert(0, Landed("b", garbled, 1, 9_000, False, incarnation=inc))  # type: ignore[arg-type]
    p.transport.in_flight.insert(2, ("not", "a", "status"))  # type: ignore[arg-type]
    p.receiver.step()  # one batch: both bad items and the three good statuses
    assert p.receiver.malformed_statuses == 2
    assert p.receiver.poll("b") is S.Failed
    assert "malformed status" in (p.receiver.record("b").reason or "")
    run_until_done(p)
    take_ok(p, "a", sources["a"])
    take_ok(p, "c", sources["c"])
    p.receiver.take("b")
    assert_clean(p)


def test_a_malformed_post_is_refused_and_the_rest_of_the_batch_served() -> None:
    p = pair()
    good, victim = random_source(9_000, 8, seed=11), random_source(9_000, 8, seed=12)
    p.receiver.add("g")
    p.sender.add("g", good)
    inc = p.receiver.add("v")
    p.sender.add("v", victim)
    p.receiver.step()
    garbled: object = ("block",)
    p.transport.posts.appendleft(RoundPost("v", 0, garbled, 1, 0, incarnation=inc))  # type: ignore[arg-type]
    p.transport.posts.appendleft(object())  # type: ignore[arg-type]
    p.sender.step()
    assert p.sender.malformed_posts == 2
    run_until_done(p)
    take_ok(p, "g", good)
    result = p.receiver.take("v")
    assert result.state is S.Failed and "malformed post" in (result.reason or "")
    assert_clean(p)


# -- bad sources -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", bad_sources(16), ids=lambda c: c[0].replace(" ", "-"))
def test_a_bad_source_is_refused_at_add_and_changes_nothing(case: tuple[str, object]) -> None:
    _, source = case
    p = pair()
    p.receiver.add("ok")
    p.sender.add("ok", random_source(100, 8))
    before = (len(p.sender), "x" in p.sender)
    with pytest.raises(InvalidArgumentError, match="source"):
        p.sender.add("x", source)  # type: ignore[arg-type]
    assert (len(p.sender), "x" in p.sender) == before


def test_a_source_the_buffers_cannot_take_fails_its_request_alone() -> None:
    p = pair()
    good = random_source(9_000, 8, seed=13)
    p.receiver.add("g")
    p.sender.add("g", good)
    p.receiver.add("wide")
    p.sender.add("wide", random_source(9_000, 9, seed=14))  # hidden 9, the buffers hold 8
    p.receiver.add("f32")
    f32 = random_source(9_000, 8, seed=15)
    p.sender.add("f32", EmbeddingTensors(f32.embeddings.float(), f32.fill_ids, f32.mrope))
    run_until_done(p)
    take_ok(p, "g", good)
    for rid in ("wide", "f32"):
        result = p.receiver.take(rid)
        assert result.state is S.Failed and "could not be written" in (result.reason or "")
    assert_clean(p)


def test_a_source_that_requires_grad_is_refused_with_the_fix() -> None:
    src = random_source(10, 8)
    emb = src.embeddings.float().requires_grad_()
    p = pair()
    with pytest.raises(InvalidArgumentError, match=r"detach\(\)"):
        p.sender.add("g", EmbeddingTensors(emb, src.fill_ids, src.mrope))
    assert p.sender.add("g", EmbeddingTensors(emb.detach(), src.fill_ids, src.mrope))


# -- the sender restarts ---------------------------------------------------------------------


def test_sender_restart_fails_the_requests_in_flight_and_serves_the_next() -> None:
    p = pair(pool_blocks=128)
    p.add("old", 40_000, seed=16)
    p.receiver.step()
    p.sender.step()  # round 0 written; its status in flight
    p.transport.restart_sender()
    p.receiver.step()  # gets PeerLost: the request fails, its blocks come back
    assert p.receiver.poll("old") is S.Failed and p.receiver.peer_lost is not None
    assert not p.receiver.quarantined()
    # The loss was handled: at the next poll the transport connects the new sender and
    # reports PeerBack; from then on requests are served again.
    p.receiver.step()
    assert p.receiver.peer_lost is None and p.transport.sender_alive
    p.sender = EmbeddingSender(p.transport)  # the engine's new encode side
    p.receiver.take("old")
    del p.sources["old"]
    p.add("new", 20_000, seed=17)
    run_until_done(p)
    take_ok(p, "new", p.sources["new"])
    assert_clean(p)


def test_a_request_added_while_the_peer_is_lost_fails_at_once() -> None:
    p = pair()
    p.transport.crash_sender()
    p.receiver.step()
    p.receiver.add("late")
    result = p.receiver.take("late")
    assert result.state is S.Failed and (result.reason or "").startswith("peer lost")


def test_connection_events_keep_their_order_when_statuses_are_shuffled() -> None:
    import random

    p = pair()
    p.add("r", 20_000, seed=18)
    p.receiver.step()
    p.sender.step()
    p.transport.restart_sender()
    p.transport.in_flight.append(PeerBack("x"))  # as if reconnected
    for seed in range(20):
        p.transport.shuffle(random.Random(seed))
        events = [s for s in p.transport.in_flight if type(s) in (PeerLost, PeerBack)]
        assert [type(e) for e in events] == [PeerLost, PeerBack]


# -- aux fields end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0, 7, -3, 2**31 - 1, -(2**31)])
def test_mrope_delta_and_total_arrive_with_the_output(delta: int) -> None:
    p = pair(pool_blocks=64)
    src = random_source(20_000, 8, seed=19)
    p.receiver.add("r")
    p.sender.add("r", src, mrope_delta=delta)
    run_until_done(p)
    take_ok(p, "r", src, mrope_delta=delta)
    assert_clean(p)


def test_mrope_delta_must_fit_int32() -> None:
    p = pair()
    with pytest.raises(InvalidArgumentError, match="mrope_delta"):
        p.sender.add("r", random_source(4, 8), mrope_delta=2**31)
    assert len(p.sender) == 0


def test_the_total_must_fit_the_aux_row() -> None:
    big = torch.zeros(1, 1)
    with pytest.raises(InvalidArgumentError):
        EmbeddingSender(pair().transport).add("r", forged_tensors(big, big, big))
