"""The resumable transfer protocol end to end, in process, with the transport as adversary."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import random
import sys
import weakref
from collections.abc import Hashable

import pytest

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    DuplicateRequestError,
    EmbeddingTensors,
    InvalidArgumentError,
    LeakError,
    RequestNotFinishedError,
    UnknownRequestError,
)
from resumekit.allocator import Allocation
from resumekit.protocol import (
    Cancel,
    Cancelled,
    EmbeddingSender,
    Landed,
    ReceiverObserver,
    ResumableReceiver,
    RoundPost,
    SenderError,
    Status,
    TransferState,
)
from resumekit.protocol.receiver import ENV_DEFAULT_ALLOCATE_TOKENS
from resumekit.sim.simulate import random_source, simulate
from resumekit.transports.inprocess import InProcessTransport, Loopback

S = TransferState
BS = 128


class Rounds(ReceiverObserver):
    def __init__(self) -> None:
        self.consumed: list[tuple[Hashable, int, int, tuple[int, ...], int]] = []
        self.posts: list[RoundPost] = []
        self.failed: list[tuple[Hashable, str]] = []

    def round_posted(self, post: RoundPost) -> None:
        self.posts.append(post)

    def round_consumed(
        self, rid: Hashable, epoch: int, tokens: int, allocation: Allocation
    ) -> None:
        self.consumed.append((rid, epoch, tokens, allocation.blocks, allocation.generation))

    def request_failed(self, rid: Hashable, reason: str) -> None:
        self.failed.append((rid, reason))


def pair(pool_blocks: int = 512, **kw: object) -> Loopback:
    return Loopback(pool_blocks=pool_blocks, block_size=BS, hidden=8, **kw)  # type: ignore[arg-type]


def finish(p: Loopback, rid: Hashable = "r") -> None:
    """Run to completion and check the result and that nothing leaked."""
    steps = p.run(p.step_bound(p.sources[rid].num_tokens) * max(1, len(p.sources)))
    assert not p.live(), f"hung after {steps} steps"
    result = p.receiver.take(rid)
    assert result.state is S.Success, result.reason
    assert result.output is not None and result.output.equal(p.sources[rid])
    assert rid not in p.receiver


def quiet(p: Loopback) -> None:
    """Deliver whatever is still in flight (late statuses release quarantine)."""
    p.transport.release()
    p.transport.adversary = None
    for _ in range(4):
        p.step()


def assert_clean(p: Loopback) -> None:
    p.receiver.check_quiescent()
    p.sender.check_quiescent()
    p.allocator.check_quiescent()


# -- the required scenarios -----------------------------------------------------


def test_50k_tokens_roomy_pool_one_resume() -> None:
    obs = Rounds()
    p = pair(pool_blocks=1024, observer=obs)
    p.add("r", 50_000)
    finish(p)
    assert [c[2] for c in obs.consumed] == [8192, 41808]
    assert [post.epoch for post in obs.posts] == [0, 1]
    assert [post.sent for post in obs.posts] == [0, 8192]
    assert_clean(p)


def test_50k_tokens_capped_resumes() -> None:
    obs = Rounds()
    p = pair(pool_blocks=1024, observer=obs, max_resume_tokens=16_384)
    p.add("r", 50_000)
    finish(p)
    assert [c[2] for c in obs.consumed] == [8192, 16_384, 16_384, 9040]
    assert [c[1] for c in obs.consumed] == [0, 1, 2, 3]
    assert len(obs.posts) - 1 == 3  # three resumes
    assert_clean(p)


def test_simulate_reports_the_capped_rounds() -> None:
    report = simulate(50_000, max_round_tokens=16_384)
    assert [r.tokens for r in report.rounds] == [8192, 16_384, 16_384, 9040]
    assert report.resumes == 3 and report.intact and report.leaked_blocks == 0
    assert [r.sent for r in report.rounds] == [8192, 24_576, 40_960, 50_000]
    assert len({r.generation for r in report.rounds}) == 4


@pytest.mark.parametrize("tokens", [50_000, 8192 * 3, 1])
def test_one_round_pool_lifo_reuses_the_same_blocks(tokens: int) -> None:
    obs = Rounds()
    p = pair(pool_blocks=8192 // BS, observer=obs, reuse="lifo")
    p.add("r", tokens)
    finish(p)
    first = obs.consumed[0][3]
    generations = [c[4] for c in obs.consumed]
    for _, _, _, blocks, _ in obs.consumed:
        # The pool holds one round: each round lands in round 0's blocks (a shorter
        # last round in the part of them that LIFO hands out first).
        assert blocks == first[len(first) - len(blocks) :]
    assert generations == sorted(set(generations))
    assert len(obs.consumed) == -(-tokens // 8192)
    assert_clean(p)


def test_any_number_of_rounds() -> None:
    obs = Rounds()
    p = pair(pool_blocks=4, default_allocate=BS, max_resume_tokens=BS, observer=obs)
    p.add("r", 300 * BS - 5)
    finish(p)
    assert len(obs.consumed) == 300
    assert_clean(p)


@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
def test_room_for_two_rounds_overlaps_them(reuse: str) -> None:
    """With a full round free, the next round is posted before this one is copied out,
    into other blocks; rounds keep their full size."""
    obs = Rounds()
    p = pair(pool_blocks=128, reuse=reuse, observer=obs, max_resume_tokens=8192)
    p.add("r", 30_000)
    finish(p)
    sizes = [c[2] for c in obs.consumed]
    assert sizes == [8192, 8192, 8192, 5424]
    blocks = [set(c[3]) for c in obs.consumed]
    assert all(not (a & b) for a, b in itertools.pairwise(blocks))
    assert_clean(p)


# -- repeated, duplicated, delayed, reordered statuses ---------------------------


def test_every_status_duplicated_is_counted_not_reprocessed() -> None:
    obs = Rounds()
    p = pair(pool_blocks=64, observer=obs, reuse="lifo")

    def twice(batch: list[Status]) -> tuple[list[Status], list[Status]]:
        return [s for s in batch for _ in range(2)], []

    p.transport.adversary = twice
    p.add("r", 40_000)
    steps = p.run(200)
    result = p.receiver.take("r")
    assert result.state is S.Success, (steps, result.reason)
    assert result.output is not None and result.output.equal(p.sources["r"])
    assert result.stale_statuses == len(obs.consumed)
    assert len(obs.consumed) == len({(c[0], c[1]) for c in obs.consumed})
    assert_clean(p)


def test_late_duplicate_of_an_old_round_after_reuse() -> None:
    """The ABA case: round 1 lands in round 0's blocks; round 0's status comes again."""
    obs = Rounds()
    p = pair(pool_blocks=64, observer=obs, reuse="lifo")
    p.add("r", 20_000)
    p.step()  # post round 0
    p.sender.step()  # round 0 written, status in flight
    status0 = p.transport.in_flight[0]
    p.receiver.step()  # consume round 0, post round 1 into the same blocks
    assert obs.posts[1].blocks == obs.posts[0].blocks
    p.transport.inject(status0)  # a late copy, before round 1 is even written
    p.receiver.step()
    assert p.receiver.record("r").stale == 1
    assert len(obs.consumed) == 1
    finish(p)
    assert_clean(p)


def test_delayed_statuses_only_slow_things_down() -> None:
    p = pair(pool_blocks=64)
    p.add("r", 30_000)
    p.transport.hold()
    for _ in range(10):
        p.step()
    assert p.receiver.poll("r") is S.Transferring
    assert len(p.transport.in_flight) == 1
    p.transport.release()
    finish(p)
    assert_clean(p)


@pytest.mark.parametrize("seed", range(12))
def test_random_adversary_many_requests(seed: int) -> None:
    """Delays, duplicates and reorders across requests on a pool too small for all."""
    rng = random.Random(seed)
    obs = Rounds()
    p = pair(
        pool_blocks=rng.choice([64, 96, 200]),
        reuse=rng.choice(["lifo", "fifo"]),
        observer=obs,
        max_resume_tokens=rng.choice([None, 4096, 10_000]),
    )

    def adversary(batch: list[Status]) -> tuple[list[Status], list[Status]]:
        batch = batch + [s for s in batch if rng.random() < 0.3]
        rng.shuffle(batch)
        keep = [s for s in batch if rng.random() < 0.3]
        return [s for s in batch if s not in keep], keep

    p.transport.adversary = adversary
    for i in range(8):
        p.add(f"r{i}", rng.randint(1, 40_000), seed=i)
    p.run(2000)
    assert not p.live()
    for i in range(8):
        result = p.receiver.take(f"r{i}")
        assert result.state is S.Success, result.reason
        assert result.output is not None and result.output.equal(p.sources[f"r{i}"])
    keys = [(c[0], c[1]) for c in obs.consumed]
    assert len(keys) == len(set(keys)), "a round was consumed twice"
    quiet(p)
    assert_clean(p)


# -- abort and sender crash in every state ------------------------------------------


def test_abort_while_bootstrapping() -> None:
    p = pair()
    p.receiver.add("r", bootstrapped=False)
    assert p.receiver.poll("r") is S.Bootstrapping
    assert p.receiver.abort("r")
    assert p.receiver.poll("r") is S.Failed
    assert p.receiver.take("r").reason == "aborted by the engine"
    quiet(p)
    assert_clean(p)


def test_bootstrapped_later() -> None:
    p = pair()
    p.receiver.add("r", bootstrapped=False)
    p.sender.add("r", random_source(100, 8))
    p.sources["r"] = random_source(100, 8)
    p.step()
    assert p.receiver.poll("r") is S.Bootstrapping
    p.receiver.bootstrapped("r")
    assert p.receiver.poll("r") is S.WaitingForInput
    with pytest.raises(InvalidArgumentError):
        p.receiver.bootstrapped("r")
    finish(p)
    assert_clean(p)


def test_abort_while_waiting_for_input() -> None:
    p = pair(pool_blocks=64)
    p.add("a", 8192)
    p.add("b", 8192)
    p.receiver.step()
    assert p.receiver.poll("b") is S.WaitingForInput  # the pool holds one default round
    assert p.receiver.abort("b")
    finish(p, "a")
    assert p.receiver.take("b").state is S.Failed
    quiet(p)
    assert_clean(p)


def test_abort_with_round_in_flight_quarantines_its_blocks() -> None:
    obs = Rounds()
    p = pair(pool_blocks=64, observer=obs)  # exactly one default round
    p.add("r", 30_000)
    p.receiver.step()  # round 0 posted
    held = obs.posts[0].allocation
    assert held is not None
    assert p.receiver.abort("r")
    assert p.receiver.poll("r") is S.Failed
    assert list(p.receiver.quarantined()) == [("r", 1, 0)]  # (id, incarnation, epoch)
    assert p.allocator.is_live(held), "blocks the sender may write must not return to the pool"
    # Another request must not get those blocks while the write can still come.
    p.add("s", 100)
    p.receiver.step()
    assert p.receiver.poll("s") is S.WaitingForInput
    p.transport.hold()
    p.sender.step()  # writes round 0 into the quarantined blocks (legal), reports, gets cancel
    p.receiver.step()
    assert p.receiver.poll("s") is S.WaitingForInput
    p.transport.release()
    p.receiver.step()  # Landed releases the quarantine; s is admitted
    assert not p.receiver.quarantined()
    assert p.receiver.poll("s") is S.Transferring
    finish(p, "s")
    p.receiver.take("r")
    quiet(p)
    # The Cancelled acknowledgement came after Landed had released the blocks: ignored.
    assert p.receiver.stale_statuses == 1
    assert_clean(p)


def test_abort_before_the_sender_saw_the_round_cancels_it() -> None:
    p = pair(pool_blocks=64)
    p.receiver.add("r")
    p.receiver.step()  # round 0 posted; the sender has no source yet, so it parks the post
    p.sender.step()
    assert p.receiver.abort("r")
    p.sender.step()  # cancel: drops the parked post, acknowledges round 0
    p.receiver.step()
    assert not p.receiver.quarantined()
    p.receiver.take("r")
    assert_clean(p)


def squeeze(p: Loopback, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool pressure: another user of the pool takes every block the receiver frees."""
    monkeypatch.setattr(p.allocator, "allocate_up_to", lambda *a, **k: None)


def test_resume_waits_for_blocks_then_proceeds(monkeypatch: pytest.MonkeyPatch) -> None:
    p = pair(pool_blocks=64)
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    squeeze(p, monkeypatch)
    for _ in range(3):
        p.step()
    rec = p.receiver.record("r")
    assert rec.state is S.Transferring and rec.allocation is None and rec.epoch == 1
    monkeypatch.undo()
    finish(p)
    assert_clean(p)


def test_abort_while_waiting_for_resume_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    p = pair(pool_blocks=64)
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    squeeze(p, monkeypatch)
    p.step()
    assert p.receiver.record("r").allocation is None
    assert p.receiver.abort("r")
    monkeypatch.undo()
    p.run(5)
    assert p.receiver.take("r").reason == "aborted by the engine"
    quiet(p)
    assert_clean(p)


def test_abort_of_a_finished_request_is_a_no_op() -> None:
    p = pair()
    p.add("r", 10)
    p.run(10)
    assert not p.receiver.abort("r")
    assert p.receiver.take("r").state is S.Success
    with pytest.raises(UnknownRequestError):
        p.receiver.abort("r")


@pytest.mark.parametrize("when", ["before-admission", "in-flight", "written-unreported", "late"])
def test_sender_crash(when: str) -> None:
    p = pair(pool_blocks=128)
    p.add("r", 60_000)
    p.add("other", 100)
    if when == "before-admission":
        p.transport.crash_sender()
    elif when == "in-flight":
        p.receiver.step()
        p.transport.crash_sender()
    elif when == "written-unreported":
        p.receiver.step()
        p.transport.crash_after_next_write = True
    else:
        p.run(3)
        p.transport.crash_sender()
    p.run(50)
    assert not p.live()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason is not None and result.reason.startswith("peer lost: sender crashed")
    other = p.receiver.take("other")
    assert other.state is (S.Success if when == "late" else S.Failed)
    assert not p.receiver.quarantined()
    p.receiver.check_quiescent()
    p.allocator.check_quiescent()


def test_after_a_crash_nothing_piles_up_for_the_dead_sender() -> None:
    """Every add after crash_sender() queued a Cancel nothing would ever drain."""
    p = pair(pool_blocks=64)
    p.transport.crash_sender()
    p.receiver.step()
    for i in range(200):
        p.receiver.add(i)
        p.receiver.step()
    assert not p.transport.posts
    assert all(p.receiver.poll(i).name == "Failed" for i in range(200))


def test_crash_after_abort_releases_the_quarantine() -> None:
    p = pair(pool_blocks=64)
    p.add("r", 30_000)
    p.receiver.step()
    p.receiver.abort("r")
    assert p.receiver.quarantined()
    p.transport.crash_sender()
    p.receiver.step()
    assert not p.receiver.quarantined()
    p.receiver.take("r")
    assert_clean_receiver(p)


def assert_clean_receiver(p: Loopback) -> None:
    p.receiver.check_quiescent()
    p.allocator.check_quiescent()


# -- protocol errors: the request fails with the reason, the rest go on ---------------


def landed_for(p: Loopback, rid: str, **changes: object) -> Landed:
    """The sender's next status for ``rid``, altered."""
    p.sender.step()
    [status] = [s for s in p.transport.in_flight if getattr(s, "rid", None) == rid]
    p.transport.in_flight.remove(status)
    assert isinstance(status, Landed)
    fields = {
        "rid": status.rid,
        "epoch": status.epoch,
        "tokens": status.tokens,
        "total": status.total,
        "final": status.final,
        "incarnation": status.incarnation,
        **changes,
    }
    return Landed(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "resume_first", "reason"),
    [
        ({"epoch": 1}, False, "status for round 1, but the round in flight is 0"),
        ({"epoch": 5}, True, "status for round 5"),
        ({"total": 29_999}, True, "total changed from 30000 to 29999"),
        ({"total": 31_000}, False, "aux[0] says 30000"),
        ({"tokens": 8193}, False, "its allocation holds 8192"),
        ({"tokens": 0}, False, "carries 0 tokens"),
        ({"final": True}, False, "but says final=True"),
        ({"tokens": 8192, "total": 8192, "final": False}, False, "aux[0]"),
    ],
)
def test_protocol_errors(changes: dict[str, object], resume_first: bool, reason: str) -> None:
    p = pair(pool_blocks=256)
    p.add("r", 30_000)
    p.add("bystander", 20_000, seed=1)
    p.receiver.step()
    if resume_first:
        p.sender.step()
        p.receiver.step()  # round 0 consumed, round 1 posted
    bad = landed_for(p, "r", **changes)
    p.transport.inject(bad)
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason is not None and reason in result.reason, result.reason
    finish(p, "bystander")
    quiet(p)
    assert_clean(p)


def test_round_past_the_total() -> None:
    p = pair(pool_blocks=512, max_resume_tokens=8192 * 2)
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    p.receiver.step()  # round 1 posted with capacity 16384 > 11808 remaining
    assert p.receiver.record("r").allocation.capacity_tokens == 11_904  # type: ignore[union-attr]
    bad = landed_for(p, "r", tokens=11_850, final=True)
    p.transport.inject(bad)
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.reason is not None and "past the total" in result.reason
    quiet(p)
    assert_clean(p)


def test_status_before_any_post_is_a_protocol_error() -> None:
    p = pair(pool_blocks=64)
    p.receiver.add("r", bootstrapped=False)
    p.transport.inject(Landed("r", 0, 10, 10, True, incarnation=p.receiver.record("r").incarnation))
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason == "protocol error: status for round 0, but the round in flight is none"
    assert_clean_receiver(p)


@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
def test_peer_loss_sends_nothing_to_the_dead_peer(reuse: str) -> None:
    p = pair(pool_blocks=128, reuse=reuse)
    p.add("r", 60_000)
    p.receiver.step()  # round 0 posted, in flight
    p.transport.crash_sender()
    posted = len(p.transport.posts)
    p.receiver.step()
    assert p.receiver.poll("r") is S.Failed
    assert len(p.transport.posts) == posted  # no cancel to a sender that is gone
    assert not p.receiver.quarantined()  # a dead peer writes nothing more
    assert p.receiver.take("r").reason == "peer lost: sender crashed"
    p.allocator.check_quiescent()


def test_sender_refuses_a_wrong_resume_offset() -> None:
    p = pair(pool_blocks=256)
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    p.receiver.step()  # round 1 posted at sent=8192
    p.sender._lives["r"][0].sent = 100  # the sender's own count disagrees
    p.run(10)
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason is not None and "resumes at token 8192; 100 were sent" in result.reason
    quiet(p)
    assert_clean(p)


def test_unknown_statuses_are_counted() -> None:
    p = pair()
    p.transport.inject(Landed("ghost", 0, 1, 1, True, incarnation=1))
    p.transport.inject(SenderError("ghost", 0, "x", incarnation=1))
    p.receiver.step()
    assert p.receiver.orphan_statuses == 2


# -- many requests, tight pool ---------------------------------------------------------


@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
def test_many_requests_on_a_tight_pool_all_complete(reuse: str) -> None:
    obs = Rounds()
    p = pair(pool_blocks=80, reuse=reuse, observer=obs, max_resume_tokens=4096)
    rng = random.Random(7)
    sizes = {f"r{i}": rng.randint(1, 60_000) for i in range(20)}
    for i, (rid, n) in enumerate(sizes.items()):
        p.add(rid, n, seed=i)
    steps = p.run(5000)
    assert not p.live(), f"hung after {steps} steps"
    for rid in sizes:
        finish(p, rid)
    assert_clean(p)


def test_resumes_are_served_before_admissions() -> None:
    obs = Rounds()
    p = pair(pool_blocks=64, observer=obs)  # one default round at a time
    p.add("first", 20_000)
    for i in range(3):
        p.add(f"late{i}", 100, seed=i)
    p.run(200)
    order = [post.rid for post in obs.posts]
    first_done = max(i for i, rid in enumerate(order) if rid == "first")
    assert order[: first_done + 1] == ["first"] * (first_done + 1)
    for rid in ("first", "late0", "late1", "late2"):
        finish(p, rid)
    assert_clean(p)


# -- API contract ---------------------------------------------------------------------


def test_api_errors_leave_state_unchanged() -> None:
    p = pair()
    p.add("r", 100)
    with pytest.raises(DuplicateRequestError):
        p.receiver.add("r")
    with pytest.raises(InvalidArgumentError):
        p.receiver.add(["unhashable"])
    with pytest.raises(UnknownRequestError):
        p.receiver.poll("nope")
    with pytest.raises(UnknownRequestError):
        p.receiver.take("nope")
    with pytest.raises(UnknownRequestError):
        p.receiver.poll(["unhashable"])
    with pytest.raises(RequestNotFinishedError):
        p.receiver.take("r")
    assert len(p.receiver) == 1 and p.receiver.poll("r") is S.WaitingForInput
    finish(p)


def test_rid_reused_while_its_old_round_is_quarantined() -> None:
    p = pair(pool_blocks=128)
    p.add("r", 30_000)
    p.receiver.step()
    p.receiver.abort("r")
    p.receiver.take("r")
    assert p.receiver.quarantined()
    p.add("r", 20_000, seed=7)  # a new life of the same id, the old round still held
    finish(p)
    quiet(p)
    assert_clean(p)


def test_default_allocation_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    obs = Rounds()
    monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, "1024")
    p = pair(default_allocate=None, observer=obs)
    p.add("r", 5000)
    finish(p)
    assert obs.consumed[0][2] == 1024
    monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, "lots")
    with pytest.raises(InvalidArgumentError, match=f"{ENV_DEFAULT_ALLOCATE_TOKENS}='lots' is not"):
        pair(default_allocate=None)
    monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, "0")
    with pytest.raises(InvalidArgumentError, match=ENV_DEFAULT_ALLOCATE_TOKENS):
        pair(default_allocate=None)
    monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, "1")
    assert pair(default_allocate=None).receiver.default_allocate_tokens == 1
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv(ENV_DEFAULT_ALLOCATE_TOKENS)
        else:
            monkeypatch.setenv(ENV_DEFAULT_ALLOCATE_TOKENS, unset)
        assert pair(default_allocate=None).receiver.default_allocate_tokens == 8192


def test_default_allocation_must_fit_the_pool() -> None:
    with pytest.raises(InvalidArgumentError, match="could never be allocated"):
        pair(pool_blocks=8)


def test_records_are_small_acyclic_and_gone_after_take() -> None:
    p = pair(pool_blocks=64)
    p.add("r", 20_000)
    p.receiver.step()
    rec = p.receiver.record("r")
    size = sys.getsizeof(rec) + sum(
        sys.getsizeof(getattr(rec, f)) for f in rec.__slots__ if f not in ("__weakref__", "output")
    )
    assert size <= 1024
    ref = weakref.ref(rec)
    del rec
    finish(p)
    gc.disable()
    try:
        assert ref() is None, "the record outlived take(): a reference cycle or a leak"
    finally:
        gc.enable()
    assert len(p.receiver) == 0


def test_step_without_news_returns_the_shared_empty_tuple() -> None:
    p = pair(pool_blocks=64)
    p.add("r", 20_000)
    p.receiver.step()
    first = p.receiver.step()
    assert first == () and first is p.receiver.step()


def test_receiver_rejects_bad_configuration() -> None:
    p = pair()
    with pytest.raises(InvalidArgumentError):
        ResumableReceiver(p.buffers, p.transport, 0)
    with pytest.raises(InvalidArgumentError):
        ResumableReceiver(p.buffers, p.transport, 128, max_resume_tokens=0)
    # auto_waste was ignored whenever round 0 was fixed
    with pytest.raises(InvalidArgumentError, match="auto_waste"):
        ResumableReceiver(p.buffers, p.transport, 128, auto_waste="junk")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"incarnation": 0}, "post.incarnation"),
        ({"epoch": -1}, "post.epoch"),
        ({"sent": -5}, "post.sent"),
    ],
)
def test_post_round_refuses_what_cancel_refuses(fields: dict[str, int], name: str) -> None:
    """A post of life 0 or of a negative epoch went out, though cancel refused both."""
    transport = pair().transport
    args = {"epoch": 0, "sent": 0, "incarnation": 1} | fields
    post = RoundPost(
        "r", args["epoch"], (0,), 8, args["sent"], None, None, incarnation=args["incarnation"]
    )
    with pytest.raises(InvalidArgumentError, match=name):
        transport.post_round(post)
    assert transport.posted == 0 and not transport.posts


def test_leak_checks_name_what_is_left() -> None:
    """check_quiescent raises for each kind of leftover, and names it."""
    p = pair(pool_blocks=64)
    p.receiver.check_quiescent()
    p.sender.check_quiescent()
    p.add("r", 30_000)
    with pytest.raises(LeakError, match=r"1 request\(s\) not taken \['r'\]"):
        p.receiver.check_quiescent()
    with pytest.raises(LeakError, match=r"sender still holds sources for \['r'\]"):
        p.sender.check_quiescent()
    p.receiver.step()  # round 0 in flight
    p.receiver.abort("r")
    p.receiver.take("r")
    with pytest.raises(LeakError, match=r"1 round\(s\) in quarantine"):
        p.receiver.check_quiescent()
    quiet(p)
    p.receiver.check_quiescent()
    p.sender.check_quiescent()
    held = p.allocator.allocate(BS, "someone else")
    with pytest.raises(LeakError, match="someone else"):
        p.receiver.check_quiescent()
    assert held is not None
    p.allocator.free(held)
    p.receiver.check_quiescent()


def test_sender_membership_and_parked_posts() -> None:
    p = pair(pool_blocks=64)
    assert "r" not in p.sender and ["unhashable"] not in p.sender and len(p.sender) == 0
    p.receiver.add("r")
    p.receiver.step()
    p.sender.step()  # the post waits: no source yet
    assert "r" in p.sender and len(p.sender) == 0
    with pytest.raises(LeakError, match=r"parked posts for \['r'\]"):
        p.sender.check_quiescent()
    p.sender.add("r", random_source(20_000, 8))  # serves the parked round 0 at once
    assert "r" in p.sender and len(p.sender) == 1 and "r" not in p.sender._parked
    finish_all(p)
    assert "r" not in p.sender and len(p.sender) == 0


def finish_all(p: Loopback) -> None:
    for _ in range(50):
        p.step()
    for rid in list(p.receiver._records):
        p.receiver.take(rid)
    p.sender.check_quiescent()


def test_bootstrapped_twice_is_refused_with_the_state() -> None:
    p = pair()
    p.receiver.add("r", bootstrapped=False)
    assert p.receiver.poll("r") is S.Bootstrapping
    p.receiver.bootstrapped("r")
    with pytest.raises(
        InvalidArgumentError, match="request 'r' is WaitingForInput, not Bootstrapping"
    ):
        p.receiver.bootstrapped("r")
    assert p.receiver.poll("r") is S.WaitingForInput


def test_leak_message_lists_the_first_eight() -> None:
    p = pair()
    for i in range(10):
        p.receiver.add(i)
    with pytest.raises(LeakError, match=r"10 request\(s\) not taken \[0, 1, 2, 3, 4, 5, 6, 7\],"):
        p.receiver.check_quiescent()


def test_sender_leak_message_lists_ids() -> None:
    p = pair()
    for rid in ("b", "a"):
        p.sender.add(rid, random_source(10, 8))
    with pytest.raises(
        LeakError, match=r"sender still holds sources for \['a', 'b'\] and parked posts for \[\]"
    ):
        p.sender.check_quiescent()


def test_tombstones_are_bounded_oldest_first() -> None:
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    sender = EmbeddingSender(p.transport, max_tombstones=2)
    for i, rid in enumerate(("x", "y", "z")):
        p.transport.cancel(rid, -1, incarnation=i + 1)  # cancelled before any source came
    sender.step()
    assert sender.add("x", random_source(4, 8))  # its tombstone was evicted: kept
    assert not sender.add("y", random_source(4, 8))  # dropped
    assert not sender.add("z", random_source(4, 8))
    assert sender.add("y", random_source(4, 8))  # one tombstone each


def test_tombstones_keep_max_tombstones_lives_of_one_id() -> None:
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    sender = EmbeddingSender(p.transport, max_tombstones=2)
    for inc in (1, 2):
        p.transport.cancel("x", -1, incarnation=inc)  # two lives ended before their sources
    sender.step()
    assert not sender.add("x", random_source(4, 8))  # the first life's: dropped
    assert not sender.add("x", random_source(4, 8))  # the second's: dropped
    assert sender.add("x", random_source(4, 8))


def test_malformed_posts_that_name_no_round_are_only_counted() -> None:
    p = pair()
    garbled: object = "0"
    unhashable: object = ["r"]
    for bad in (
        Cancel(unhashable, 0, incarnation=1),  # type: ignore[arg-type]
        RoundPost("r", -1, ("x",), 1, 0, incarnation=1),  # type: ignore[arg-type]
        RoundPost("r", 0, ("x",), 1, 0, incarnation=garbled),  # type: ignore[arg-type]
        RoundPost("r", garbled, ("x",), 1, 0, incarnation=1),  # type: ignore[arg-type]
    ):
        p.transport.posts.append(bad)
    p.sender.step()
    assert p.sender.malformed_posts == 4
    assert not p.transport.in_flight  # no refusal: none of them names a round


def test_a_refused_round_ends_its_life_at_once() -> None:
    p = pair()
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    p.receiver.step()  # round 1 posted at sent=8192
    p.sender._lives["r"][0].sent = 100  # the sender's own count disagrees: refused
    p.sender.step()
    assert "r" not in p.sender and len(p.sender) == 0  # before the receiver's cancel
    p.run(10)
    assert p.receiver.take("r").state is S.Failed


def test_leak_message_lists_the_first_eight_quarantined() -> None:
    p = pair(pool_blocks=64, default_allocate=BS)
    rids = [f"r{i}" for i in range(10)]
    for rid in rids:
        p.add(rid, 3 * BS)
    p.receiver.step()  # every round 0 in flight
    for rid in rids:
        p.receiver.abort(rid)
    p.receiver.take(rids[-1])
    with pytest.raises(LeakError) as error:
        p.receiver.check_quiescent()
    assert str(error.value).startswith(
        f"9 request(s) not taken {rids[:8]}, 10 round(s) in quarantine "
    )
    quarantined = list(p.receiver.quarantined())
    assert len(quarantined) == 10
    assert f"in quarantine {quarantined[:8]}" in str(error.value)


def test_each_life_cancelled_before_its_source_drops_one_add() -> None:
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    for incarnation in (1, 2):
        p.transport.cancel("x", -1, incarnation=incarnation)
    p.sender.step()
    assert not p.sender.add("x", random_source(4, 8))
    assert not p.sender.add("x", random_source(4, 8))
    assert p.sender.add("x", random_source(4, 8))  # a third life: kept


def test_a_named_source_of_a_cancelled_life_leaves_the_next_lifes_unnamed_one_alone() -> None:
    """The named late source is the one the cancelled life's tombstone waited for; it used
    to leave the tombstone behind, which then ate life 2's unnamed source (life 2 hung in
    Transferring, holding its blocks)."""
    p = pair()
    i1 = p.receiver.add("x")
    p.receiver.abort("x")
    p.sender.step()  # the cancel: life 1 ended before its source came
    assert not p.sender.add("x", random_source(4, 8), incarnation=i1)
    assert p.sender.snapshot().cancelled == ()
    p.receiver.take("x")
    p.receiver.add("x")
    src = random_source(300, 8, seed=2)
    assert p.sender.add("x", src)  # life 2's, unnamed
    for _ in range(10):
        p.step()
    result = p.receiver.take("x")
    assert result.state is S.Success, result.reason
    assert result.output is not None and result.output.equal(src)
    assert_clean(p)


def test_a_named_source_of_an_ended_life_with_no_tombstone_left_is_dropped() -> None:
    """Life 1 ended twice over for its sources: its tombstone was consumed by the first
    late source, and a second one (or one of a life that ended with its source in hand)
    finds none; it is dropped and changes nothing, life 2's tombstone included."""
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    for incarnation in (1, 2):
        p.transport.cancel("x", -1, incarnation=incarnation)
    p.sender.step()
    assert not p.sender.add("x", random_source(4, 8), incarnation=1)  # takes life 1's
    before = p.sender.snapshot()
    assert not p.sender.add("x", random_source(4, 8), incarnation=1)  # none left for it
    assert p.sender.snapshot() == before
    assert not p.sender.add("x", random_source(4, 8))  # life 2's tombstone is still there
    assert p.sender.snapshot().cancelled == ()
    q = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    q.transport.cancel("y", -1, incarnation=1)
    q.sender.step()  # a life of y ended, and no life of "z" has ended with no source
    assert not q.sender.add("y", random_source(4, 8), incarnation=1)
    assert not q.sender.add("y", random_source(4, 8), incarnation=1)  # no tombstones of y
    assert q.sender.snapshot().cancelled == ()


def test_an_unnamed_late_source_is_the_oldest_waiting_lifes() -> None:
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    for incarnation in (1, 2):
        p.transport.cancel("x", -1, incarnation=incarnation)
    p.sender.step()
    assert not p.sender.add("x", random_source(4, 8))  # life 1's
    assert not p.sender.add("x", random_source(4, 8), incarnation=2)  # life 2's, named
    assert p.sender.snapshot().cancelled == ()
    assert p.sender.add("x", random_source(4, 8))  # a third life: kept


def test_a_second_source_for_a_named_life_is_refused_and_nothing_changes() -> None:
    p = pair()
    incarnation = p.receiver.add("x")
    first = random_source(20_000, 8, seed=1)
    assert p.sender.add("x", first, incarnation=incarnation)
    before = p.sender.snapshot()
    with pytest.raises(DuplicateRequestError, match="already has its source"):
        p.sender.add("x", random_source(300, 8, seed=2), incarnation=incarnation)
    assert p.sender.snapshot() is before
    p.step()  # round 0 served from the named source; it still has the rest to send
    assert p.receiver.record("x").sent > 0 or p.transport.in_flight
    with pytest.raises(DuplicateRequestError):
        p.sender.add("x", random_source(300, 8, seed=3), incarnation=incarnation)
    for _ in range(10):
        p.step()
    result = p.receiver.take("x")
    assert result.output is not None and result.output.equal(first)
    assert_clean(p)


def test_a_malformed_post_for_a_life_not_yet_added_refuses_it_and_drops_its_source() -> None:
    p = pair()
    p.transport.posts.append(RoundPost("r", 0, ("x",), 1, 0, incarnation=1))  # type: ignore[arg-type]
    p.sender.step()
    assert p.sender.malformed_posts == 1
    (refusal,) = p.transport.in_flight
    assert isinstance(refusal, SenderError) and (refusal.rid, refusal.epoch) == ("r", 0)
    assert refusal.incarnation == 1 and refusal.reason.startswith("malformed post: ")
    assert not p.sender.add("r", random_source(4, 8))  # the refused life's source is not kept
    p.sender.check_quiescent()


def test_a_malformed_post_for_an_ended_life_changes_nothing() -> None:
    p = pair()
    p.transport.cancel("r", -1, incarnation=1)
    p.sender.step()  # life 1 of r has ended here
    stale = p.sender.stale_posts
    p.transport.posts.append(RoundPost("r", 3, ("x",), 1, 0, incarnation=1))  # type: ignore[arg-type]
    p.sender.step()
    assert p.sender.malformed_posts == 1 and p.sender.stale_posts == stale + 1
    assert not p.transport.in_flight  # no refusal for a life that is over
    assert not p.sender.add("r", random_source(4, 8))  # life 1's tombstone, once
    assert p.sender.add("r", random_source(4, 8))


@pytest.mark.parametrize("old_epoch", [0, 1])
def test_a_refusal_of_an_earlier_round_is_stale(old_epoch: int) -> None:
    p = pair(pool_blocks=64, default_allocate=BS, max_resume_tokens=BS)
    p.add("r", 20 * BS)
    for _ in range(20):
        if p.receiver.record("r").epoch == 2:
            break
        p.step()
    record = p.receiver.record("r")
    assert record.state is S.Transferring and record.epoch == 2
    stale = p.receiver.stale_statuses
    p.transport.inject(Cancelled("r", old_epoch, incarnation=record.incarnation))
    p.receiver.step()
    assert p.receiver.stale_statuses == stale + 1
    assert p.receiver.poll("r") is S.Transferring
    finish(p)
    assert_clean(p)


def test_a_refusal_of_the_round_in_flight_frees_it_at_once() -> None:
    rounds = Rounds()
    p = pair(pool_blocks=64, observer=rounds)
    p.add("r", 20 * BS)
    p.receiver.step()  # round 0 posted; the sender has not seen it
    record = p.receiver.record("r")
    free = p.allocator.num_free_blocks
    held = len(record.allocation.blocks)  # type: ignore[union-attr]
    p.transport.inject(Cancelled("r", 0, incarnation=record.incarnation))
    assert list(p.receiver.step()) == ["r"]
    reason = "sender error: cancelled the round"
    assert p.receiver.take("r").reason == reason and rounds.failed == [("r", reason)]
    assert not p.receiver.quarantined()  # it will not be written: no quarantine
    assert p.allocator.num_free_blocks == free + held
    # The cancel names no round: nothing is in flight, so nothing comes back for it.
    assert p.transport.posts[-1] == Cancel("r", -1, incarnation=record.incarnation)


def test_an_abort_cancels_the_round_in_flight_by_its_epoch() -> None:
    rounds = Rounds()
    p = pair(pool_blocks=64, observer=rounds)
    p.add("r", 20 * BS)
    p.receiver.step()
    incarnation = p.receiver.record("r").incarnation
    assert p.receiver.abort("r", "no longer wanted")
    assert rounds.failed == [("r", "no longer wanted")]
    assert p.transport.posts[-1] == Cancel("r", 0, incarnation=incarnation)
    assert list(p.receiver.quarantined()) == [("r", incarnation, 0)]
    p.receiver.take("r")
    quiet(p)
    assert_clean(p)


def test_every_stale_status_is_counted() -> None:
    p = pair(pool_blocks=64, default_allocate=BS, max_resume_tokens=BS)
    p.add("r", 20 * BS)
    for _ in range(20):
        if p.receiver.record("r").epoch == 2:
            break
        p.step()
    incarnation = p.receiver.record("r").incarnation
    for epoch in (0, 1, 0):
        p.transport.inject(Cancelled("r", epoch, incarnation=incarnation))
    p.receiver.step()
    assert p.receiver.stale_statuses == 3 and p.receiver.record("r").stale == 3


def test_allocation_repr_names_everything() -> None:
    a = BlockAllocator(8, BS).allocate(2 * BS, "owner")
    assert a is not None
    assert repr(a) == (
        f"Allocation(generation=0, owner='owner', blocks={list(a.blocks)}, "
        f"capacity_tokens={2 * BS})"
    )


@pytest.mark.parametrize("pool_blocks", [3, 64])  # resumes after the free; early ones
def test_every_round_is_allocated_to_its_request(pool_blocks: int) -> None:
    p = pair(pool_blocks=pool_blocks, default_allocate=2 * BS, max_resume_tokens=2 * BS)
    p.add("r", 20 * BS)
    owners: set[Hashable] = set()
    rounds = 0
    for _ in range(200):
        if not p.live():
            break
        p.step()
        owners |= {a.owner for a in p.allocator.outstanding()}
        rounds = p.receiver.record("r").epoch
    assert owners == {"r"} and rounds == 9
    finish(p)


def test_unknown_and_unhashable_ids() -> None:
    p = pair()
    assert "zzz" not in p.receiver and ["a list"] not in p.receiver
    with pytest.raises(UnknownRequestError) as error:
        p.receiver.poll("zzz")
    assert str(error.value) == "unknown request 'zzz'"
    with pytest.raises(UnknownRequestError):
        p.receiver.poll(["a list"])  # type: ignore[arg-type]


def test_round_0_past_the_total_is_refused_even_when_not_final() -> None:
    p = pair(pool_blocks=512)
    p.add("r", 100)
    p.receiver.step()  # round 0: 8192 tokens of room for a 100-token embedding
    p.transport.inject(landed_for(p, "r", tokens=200, final=False))
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason is not None and "past the total" in result.reason


def test_a_life_that_ends_again_is_the_newest_tombstone() -> None:
    p = Loopback(pool_blocks=64, block_size=BS, hidden=8)
    sender = EmbeddingSender(p.transport, max_tombstones=2)
    for rid, incarnation in (("x", 1), ("y", 1), ("x", 2), ("z", 1)):
        p.transport.cancel(rid, -1, incarnation=incarnation)
    sender.step()
    stale = sender.stale_posts
    # x (refreshed by life 2) and z are remembered; y, the oldest, was evicted.
    p.transport.cancel("x", -1, incarnation=2)
    p.transport.cancel("y", -1, incarnation=1)
    sender.step()
    assert sender.stale_posts == stale + 1


def _sender_with_round_0_posted() -> tuple[Loopback, RoundPost]:
    p = pair(pool_blocks=512)
    p.add("r", 20_000)
    p.receiver.step()
    [post] = [x for x in p.transport.posts if isinstance(x, RoundPost)]
    return p, post


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"epoch": 2}, "round 2 posted before round 0"),
        ({"sent": 5}, "round 0 resumes at token 5; 0 were sent"),
        ({"capacity_tokens": 0}, "round 0 offers 0 tokens"),
        ({"expect_tokens": 9}, "round 0 would carry 8192 tokens; the receiver expects 9"),
    ],
)
def test_the_sender_refuses_a_round_it_cannot_serve(changes: dict[str, int], reason: str) -> None:
    p, post = _sender_with_round_0_posted()
    p.transport.posts.clear()
    p.transport.posts.append(dataclasses.replace(post, **changes))  # type: ignore[arg-type]
    p.sender.step()
    assert p.sender.rounds_served == 0
    [refusal] = p.transport.in_flight
    assert refusal == SenderError("r", changes.get("epoch", 0), reason, incarnation=1)
    assert "r" not in p.sender  # the refused life is over here


def test_every_repeated_post_is_counted() -> None:
    p, post = _sender_with_round_0_posted()
    p.sender.step()
    p.transport.posts.extend([post, post])
    p.sender.step()
    assert p.sender.repeated_posts == 2 and p.sender.rounds_served == 1


def test_no_room_for_the_output_fails_that_request_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = pair(pool_blocks=512)
    p.add("r", 20_000)

    def no_memory(total: int) -> None:
        raise MemoryError

    monkeypatch.setattr(p.buffers, "new_output", no_memory)
    p.run(5)
    result = p.receiver.take("r")
    assert result.reason == "protocol error: no room for the output of 20000 tokens (MemoryError)"


def test_every_round_served_is_counted() -> None:
    p = pair(pool_blocks=64, default_allocate=BS, max_resume_tokens=BS)
    p.add("r", 3 * BS)
    finish(p)
    assert p.sender.rounds_served == 3


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_status_while_a_resume_waits_for_blocks(
    monkeypatch: pytest.MonkeyPatch, epoch: int
) -> None:
    """A late copy of round 0 is stale; one for the round not yet posted is an error."""
    p = pair(pool_blocks=64)
    p.add("r", 20_000)
    p.receiver.step()
    p.sender.step()
    squeeze(p, monkeypatch)
    for _ in range(3):
        p.step()
    rec = p.receiver.record("r")
    assert rec.state is S.Transferring and rec.allocation is None and rec.epoch == 1
    p.transport.inject(Landed("r", epoch, 8192, 20_000, False, incarnation=rec.incarnation))
    p.receiver.step()
    if epoch == 0:
        assert rec.stale == 1 and p.receiver.poll("r") is S.Transferring
        monkeypatch.undo()
        finish(p)
    else:
        result = p.receiver.take("r")
        in_flight = "but the round in flight is none"
        assert result.reason == f"protocol error: status for round 1, {in_flight}"
        quiet(p)  # the sender hears of it
    assert_clean(p)


# -- what the mutation run showed no test looked at ------------------------------------------


def test_take_hands_over_the_id_and_the_round_count() -> None:
    p = pair(pool_blocks=64)
    p.add("r", 20_000)  # 8192 + 8192 + 3616: three rounds
    p.run(64)
    result = p.receiver.take("r")
    assert result.ok and result.rid == "r" and result.rounds == 3


def test_a_malformed_status_fails_its_request_naming_the_problem() -> None:
    p = pair()
    p.add("r", 100)
    p.add("other", 100)
    p.receiver.step()
    incarnation = p.receiver.record("r").incarnation
    p.transport.inject(Landed("r", 0, "100", 100, True, incarnation=incarnation))  # type: ignore[arg-type]
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason == "protocol error: malformed status (tokens and total must be ints)"
    assert p.receiver.malformed_statuses == 1
    finish(p, "other")


def test_a_post_delivered_as_a_status_fails_the_request_it_names() -> None:
    p = pair()
    p.add("r", 100)
    p.receiver.step()
    post = p.transport.posts[0]
    p.transport.inject(post)  # type: ignore[arg-type]
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason == "protocol error: malformed status (RoundPost is not a status)"


class _PoisonedBuffers(BlockBuffers):
    """Buffers whose reads fail for one owner: a bad value past every earlier check."""

    poisoned: Hashable = None

    def read_into(self, allocation: Allocation, n: int, out: EmbeddingTensors, offset: int) -> None:
        if allocation.owner == self.poisoned:
            raise InvalidArgumentError("poisoned read")
        super().read_into(allocation, n, out, offset)


@pytest.mark.parametrize(
    ("pool_blocks", "tokens"),
    [(256, 20_000), (128, 20_000), (256, 100)],
    ids=["next-round-already-posted", "no-room-to-post-early", "single-round"],
)
def test_an_error_past_the_checks_fails_that_request_alone_and_cancels_it(
    pool_blocks: int, tokens: int
) -> None:
    allocator = BlockAllocator(pool_blocks, BS)
    buffers = _PoisonedBuffers(allocator, 8, device="cpu")
    buffers.poisoned = "bad"
    transport = InProcessTransport(buffers)
    observer = Rounds()
    receiver = ResumableReceiver(buffers, transport, observer=observer)
    sender = EmbeddingSender(transport)
    sources = {"bad": random_source(tokens, 8, seed=1), "good": random_source(tokens, 8, seed=2)}
    for rid, src in sources.items():
        receiver.add(rid)
        sender.add(rid, src)
    for _ in range(40):
        sender.step()
        receiver.step()
    bad, good = receiver.take("bad"), receiver.take("good")
    assert bad.state is S.Failed and bad.reason == "protocol error: poisoned read"
    assert observer.failed == [("bad", "protocol error: poisoned read")]
    assert good.ok and good.output is not None and good.output.equal(sources["good"])
    receiver.check_quiescent()
    sender.check_quiescent()  # the sender was told: it holds nothing of "bad"


def test_a_malformed_post_is_refused_naming_the_problem() -> None:
    p = pair()
    p.sender.add("r", random_source(100, 8), incarnation=1)
    p.transport.posts.append(RoundPost("r", 0, [0], BS, 0, incarnation=1))  # type: ignore[arg-type]
    p.sender.step()
    [status] = p.transport.in_flight
    assert status == SenderError(
        "r", 0, "malformed post: blocks must be a tuple of ints", incarnation=1
    )
    assert p.sender.malformed_posts == 1 and len(p.sender) == 0


def test_every_stale_post_is_counted() -> None:
    p = pair()
    p.transport.cancel("r", -1, incarnation=1)
    p.sender.step()  # life 1 of "r" ended here before its source came
    for _ in range(2):
        p.transport.posts.append(RoundPost("r", 0, (0,), BS, 0, incarnation=1))
    p.sender.step()
    assert p.sender.stale_posts == 2


def test_a_post_of_a_newer_life_ends_the_older_named_ones() -> None:
    p = pair()
    p.sender.add("r", random_source(100, 8, seed=1), incarnation=1)
    p.sender.add("r", random_source(100, 8, seed=2), incarnation=2)
    allocation = p.allocator.allocate(BS, "r")
    assert allocation is not None
    p.transport.posts.append(RoundPost("r", 0, allocation.blocks, BS, 0, allocation, incarnation=2))
    p.sender.step()
    [status] = p.transport.in_flight
    assert status == Landed("r", 0, 100, 100, True, incarnation=2)
    assert len(p.sender) == 0  # life 1's source went with life 2's first post
    p.transport.posts.append(RoundPost("r", 0, allocation.blocks, BS, 0, incarnation=1))
    p.sender.step()
    assert p.sender.stale_posts == 1


def test_a_post_of_a_newer_life_waits_once_the_older_source_is_gone() -> None:
    p = pair()
    p.sender.add("r", random_source(100, 8, seed=1), incarnation=1)
    p.transport.posts.append(RoundPost("r", 0, (0,), BS, 0, incarnation=2))
    p.sender.step()  # ends life 1; life 2 has no source yet: the post waits for it
    assert len(p.sender) == 0 and "r" in p.sender and not p.transport.in_flight


def test_a_landed_status_of_a_negative_epoch_is_a_protocol_error() -> None:
    p = pair()
    p.add("r", 100)
    p.receiver.step()
    incarnation = p.receiver.record("r").incarnation
    p.transport.inject(Landed("r", -1, 100, 100, True, incarnation=incarnation))
    p.receiver.step()
    result = p.receiver.take("r")
    assert result.state is S.Failed
    assert result.reason == "protocol error: status for round -1, but the round in flight is 0"


def test_a_resume_post_says_how_many_tokens_to_expect() -> None:
    rounds = Rounds()
    p = pair(pool_blocks=64, observer=rounds)
    p.add("r", 20_000)
    p.run(64)
    assert p.receiver.take("r").ok
    expected = [(0, None), (1, 8192), (2, 20_000 - 2 * 8192)]
    assert [(post.epoch, post.expect_tokens) for post in rounds.posts] == expected


def test_sender_step_counts_the_rounds_of_that_step() -> None:
    p = pair(pool_blocks=128)
    p.add("a", 20_000)
    counts = []
    for _ in range(8):
        p.receiver.step()
        counts.append(p.sender.step())
    assert counts[:2] == [1, 1] and set(counts) == {0, 1}
    assert sum(counts) == 2 == p.sender.rounds_served


def test_an_aborted_admission_at_the_head_does_not_hold_up_the_next() -> None:
    p = pair(pool_blocks=128)  # room for two default rounds
    for rid in ("a", "b", "c", "d"):
        p.receiver.add(rid)
    p.receiver.step()
    assert [p.receiver.poll(r) for r in "abcd"] == [S.Transferring] * 2 + [S.WaitingForInput] * 2
    assert p.receiver.abort("c") and p.receiver.abort("a")  # a's round goes to quarantine
    p.sender.step()  # the sender cancels a's round: its blocks may be reused
    p.receiver.step()
    assert p.receiver.poll("d") is S.Transferring  # admitted in that same step


class _PoisonedAux(BlockBuffers):
    """Buffers whose aux reads fail for one owner, before its round is consumed."""

    poisoned: Hashable = None

    def read_aux(self, allocation: Allocation) -> tuple[int, ...]:
        if allocation.owner == self.poisoned:
            raise InvalidArgumentError("poisoned aux")
        return super().read_aux(allocation)


def test_an_error_reading_a_landed_round_releases_it_at_once() -> None:
    """The sender reported the round landed: it writes those blocks no more, so they go
    straight back to the pool, not to a quarantine nothing would release."""
    allocator = BlockAllocator(128, BS)
    buffers = _PoisonedAux(allocator, 8, device="cpu")
    buffers.poisoned = "bad"
    transport = InProcessTransport(buffers)
    receiver = ResumableReceiver(buffers, transport)
    sender = EmbeddingSender(transport)
    receiver.add("bad")
    sender.add("bad", random_source(100, 8))
    receiver.step()  # round 0 posted
    sender.step()  # written, reported landed
    receiver.step()  # reading its aux fails
    assert receiver.poll("bad") is S.Failed
    assert receiver.quarantined() == {} and allocator.num_free_blocks == 128
    sender.step()
    receiver.step()
    result = receiver.take("bad")
    assert result.state is S.Failed and result.reason == "protocol error: poisoned aux"
    receiver.check_quiescent()
    sender.check_quiescent()


def test_step_returns_the_ids_that_finished_and_results_start_clean() -> None:
    p = pair()
    p.add("ok", 100)
    p.receiver.add("early")
    p.receiver.abort("early")  # failed before any round landed
    finished: list[Hashable] = []
    for _ in range(4):
        finished += p.step()
    assert sorted(finished, key=str) == ["early", "ok"]
    ok, early = p.receiver.take("ok"), p.receiver.take("early")
    assert ok.ok and ok.reason is None and ok.mrope_delta == 0
    assert early.state is S.Failed and early.mrope_delta == 0 and early.output is None


def test_an_add_after_the_peer_is_lost_sends_one_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    p = pair()
    p.transport.crash_sender()
    p.receiver.step()
    assert p.receiver.peer_lost is not None
    sent: list[object] = []
    monkeypatch.setattr(p.transport, "cancel", lambda *a, **kw: sent.append((a, kw)))
    p.receiver.add("late")
    assert p.receiver.poll("late") is S.Failed
    assert len(sent) == 1


@pytest.mark.parametrize(("aborted", "other"), [("a", "b"), ("b", "a")])
def test_an_aborted_resume_at_the_head_does_not_hold_up_the_next(
    monkeypatch: pytest.MonkeyPatch, aborted: str, other: str
) -> None:
    """Whichever of the two waits at the head, aborting it lets the other resume at once."""
    p = pair(pool_blocks=128)
    p.add("a", 20_000)
    p.add("b", 20_000)
    p.receiver.step()
    p.sender.step()
    squeeze(p, monkeypatch)
    for _ in range(3):
        p.step()
    waiting = p.receiver.record(other)
    assert p.receiver.record(aborted).allocation is None and waiting.allocation is None
    assert p.receiver.abort(aborted)
    monkeypatch.undo()
    p.receiver.step()
    assert waiting.allocation is not None  # resumed in that same step
