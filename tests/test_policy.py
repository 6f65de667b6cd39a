"""The receiver's scheduling policy: bulk requests yield and are chunked, a window bounds
rounds in flight, nobody is passed over without end, and every request still lands."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
import torch

from resumekit import InvalidArgumentError, ResumableReceiver, SchedulingPolicy, TransferState
from resumekit.protocol.messages import RoundPost
from resumekit.protocol.receiver import ReceiverObserver
from resumekit.transports.inprocess import Loopback


class Posts(ReceiverObserver):
    """Every round posted, in order: (rid, epoch, capacity)."""

    def __init__(self) -> None:
        self.posts: list[tuple[Hashable, int, int]] = []

    def round_posted(self, post: RoundPost) -> None:
        self.posts.append((post.rid, post.epoch, post.capacity_tokens))


def _pair(policy: SchedulingPolicy | None, *, blocks: int = 16, default: int = 4) -> Loopback:
    return Loopback(
        pool_blocks=blocks,
        block_size=1,
        hidden=2,
        default_allocate=default,
        observer=Posts(),
        policy=policy,
    )


def _posts(pair: Loopback) -> list[tuple[Hashable, int, int]]:
    observer = pair.receiver.observer
    assert isinstance(observer, Posts)
    return observer.posts


def _in_flight(pair: Loopback) -> int:
    return sum(1 for r in pair.receiver.snapshot().records if r.allocation is not None)


def _yielding(pair: Loopback) -> set[Hashable]:
    """The waiting resumes that yield: bulk, or more than yield_tokens left, either passed
    over fewer than max_passed_over times."""
    policy = pair.receiver.policy
    if policy is None:
        return set()
    assert policy.bulk_tokens is not None and policy.yield_tokens is not None
    return {
        r.rid
        for r in pair.receiver.snapshot().resumes
        if r.allocation is None
        and r.total is not None
        and r.passed < policy.max_passed_over
        and (r.total > policy.bulk_tokens or r.total - r.sent > policy.yield_tokens)
    }


def _run_all(pair: Loopback, max_steps: int = 5_000) -> None:
    assert pair.run(max_steps) < max_steps, "stuck"
    for rid, source in pair.sources.items():
        result = pair.receiver.take(rid)
        assert result.state is TransferState.Success, (rid, result.reason)
        assert result.output is not None
        assert torch.equal(result.output.embeddings, source.embeddings)


def test_a_bulk_request_is_chunked_and_still_lands() -> None:
    policy = SchedulingPolicy(bulk_tokens=8, bulk_round_tokens=3)
    pair = _pair(policy)
    pair.add("big", 40)
    _run_all(pair)
    rounds = [cap for rid, _, cap in _posts(pair) if rid == "big"]
    assert rounds[0] == 4  # round 0: its size was not known yet
    assert all(cap <= 3 for cap in rounds[1:]) and len(rounds) == 1 + -(-36 // 3)


def test_without_a_policy_the_rest_takes_what_is_free() -> None:
    pair = _pair(None)
    pair.add("big", 40)
    _run_all(pair)
    assert [cap for _, _, cap in _posts(pair)][1] == 16  # the whole free pool


def test_the_window_bounds_rounds_in_flight_and_everyone_lands() -> None:
    pair = _pair(SchedulingPolicy(max_rounds_in_flight=2))
    for i in range(6):
        pair.add(i, 3 + 5 * i)
    most = 0
    for _ in range(2_000):
        pair.step()
        most = max(most, _in_flight(pair))
        if not pair.live():
            break
    assert most == 2
    _run_all(pair)


def test_an_admission_passes_a_waiting_bulk_resume_then_it_goes_first() -> None:
    """A window of one makes everyone wait; the bulk resume lets one admission pass, then
    the next admission waits for it (max_passed_over=1)."""
    policy = SchedulingPolicy(max_rounds_in_flight=1, bulk_tokens=8, max_passed_over=1)
    pair = _pair(policy)
    pair.add("big", 20)
    while not _posts(pair) or _posts(pair)[-1][:2] != ("big", 0):
        pair.step()
    pair.add("a", 2)
    pair.add("b", 2)
    _run_all(pair)
    order = [(rid, epoch) for rid, epoch, _ in _posts(pair)]
    assert order[:4] == [("big", 0), ("a", 0), ("big", 1), ("b", 0)], order


def test_a_bulk_resume_is_passed_over_at_most_max_passed_over_times() -> None:
    policy = SchedulingPolicy(max_rounds_in_flight=1, bulk_tokens=8, max_passed_over=2)
    pair = _pair(policy)
    pair.add("big", 20)
    while not _posts(pair) or _posts(pair)[-1][:2] != ("big", 0):
        pair.step()
    for rid in ("a", "b", "c"):
        pair.add(rid, 2)
    _run_all(pair)
    order = [(rid, epoch) for rid, epoch, _ in _posts(pair)]
    assert order[:5] == [("big", 0), ("a", 0), ("b", 0), ("big", 1), ("c", 0)], order


def test_normal_resumes_go_before_admissions_and_bulk_after_them() -> None:
    policy = SchedulingPolicy(max_rounds_in_flight=1, bulk_tokens=8, max_passed_over=5)
    pair = _pair(policy)
    pair.add("big", 30)
    pair.add("mid", 6)  # two rounds: 4, then 2
    _run_all(pair)
    order = [(rid, epoch) for rid, epoch, _ in _posts(pair)]
    # mid's resume (not bulk) goes before big's (bulk), though big waited first.
    assert order.index(("mid", 1)) < order.index(("big", 1)), order


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_under_a_policy_lands_intact(seed: int) -> None:
    rng = random.Random(seed)
    policy = SchedulingPolicy(
        max_rounds_in_flight=rng.choice([None, 1, 2, 3]),
        bulk_tokens=rng.choice([None, 4, 8]),
        bulk_round_tokens=rng.choice([None, 1, 4]),
        max_passed_over=rng.randint(0, 4),
    )
    pair = _pair(policy, blocks=rng.randint(4, 12))
    for i in range(8):
        pair.add(i, rng.randint(1, 40), seed=i)
    _run_all(pair, 20_000)
    pair.receiver.check_quiescent()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_rounds_in_flight": 0}, "max_rounds_in_flight"),
        ({"bulk_tokens": -1}, "bulk_tokens"),
        ({"bulk_round_tokens": 1.5}, "bulk_round_tokens"),
        ({"max_passed_over": -1}, "max_passed_over"),
        ({"max_passed_over": True}, "max_passed_over"),
        ({"yield_tokens": 0}, "yield_tokens"),
        ({"yield_tokens": "half"}, "yield_tokens"),
    ],
)
def test_a_policy_refuses_numbers_no_receiver_serves_by(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        SchedulingPolicy(**fields)  # type: ignore[arg-type]


def test_the_receiver_refuses_what_is_not_a_policy() -> None:
    pair = _pair(None)
    with pytest.raises(InvalidArgumentError, match="policy must be a SchedulingPolicy"):
        ResumableReceiver(pair.buffers, pair.transport, 4, policy="fair")  # type: ignore[arg-type]


def test_the_policy_is_resolved_for_the_pool() -> None:
    pair = _pair(SchedulingPolicy())
    assert pair.receiver.policy == SchedulingPolicy(None, 16, 2, 32, 8)


def test_a_one_block_pool_resolves_yield_tokens_to_one() -> None:
    """Half of a one-token pool is 0, which no policy may hold (the fuzzer found it)."""
    assert SchedulingPolicy().resolved(1, 1).yield_tokens == 1
    assert SchedulingPolicy(yield_tokens=5).resolved(1, 1).yield_tokens == 5


def test_a_large_resume_yields_to_admissions_then_takes_an_idle_link() -> None:
    """With two rounds in flight allowed, a resume with more than yield_tokens left waits
    for admissions and for the other round to land; a small resume does not wait."""
    policy = SchedulingPolicy(max_rounds_in_flight=2, max_passed_over=8, yield_tokens=4)
    pair = _pair(policy, blocks=16, default=2)
    pair.add("large", 12)  # 10 left after round 0: yields
    pair.add("small", 3)  # 1 left: first-class
    _run_all(pair)
    order = [(rid, epoch) for rid, epoch, _ in _posts(pair)]
    assert order.index(("small", 1)) < order.index(("large", 1)), order
    pair = _pair(policy, blocks=16, default=2)
    pair.add("large", 12)
    while ("large", 0) not in [(r, e) for r, e, _ in _posts(pair)]:
        pair.step()
    for rid in "abc":
        pair.add(rid, 2)
    while ("large", 1) not in [(r, e) for r, e, _ in _posts(pair)]:
        pair.step()
    assert _in_flight(pair) == 1  # posted alone, on an idle link
    _run_all(pair)
    order = [(rid, epoch) for rid, epoch, _ in _posts(pair)]
    # The admissions go first; then the large resume.
    assert max(order.index((rid, 0)) for rid in "abc") < order.index(("large", 1)), order


def test_no_resume_waits_while_blocks_it_may_take_are_free() -> None:
    """Work conservation: after a step, a resume waits with blocks free only behind a
    full window or an admission waiting for a default round."""
    waited = yielded = 0
    for seed in range(40):
        rng = random.Random(seed)
        policy = SchedulingPolicy(
            max_rounds_in_flight=rng.choice([None, 2, 3]),
            bulk_tokens=rng.choice([None, 4]),
            bulk_round_tokens=rng.choice([None, 1, 2]),
            max_passed_over=rng.randint(0, 3),
            yield_tokens=rng.choice([None, 2, 8]),
        )
        pair = _pair(policy if seed % 4 else None, blocks=rng.randint(4, 6), default=2)
        for i in range(8):
            pair.add(i, rng.randint(1, 30), seed=i)
        resolved = pair.receiver.policy
        window = None if resolved is None else resolved.max_rounds_in_flight
        for _ in range(20_000):
            if not pair.live():
                break
            pair.step()
            snap = pair.receiver.snapshot()
            free = pair.receiver.allocator.num_free_blocks
            waited += bool(snap.resumes)
            if snap.resumes and free:
                full = window is not None and _in_flight(pair) >= window
                # A yielding resume waits for an idle link; none other waits.
                others = {r.rid for r in snap.resumes if r.allocation is None} - _yielding(pair)
                busy = _in_flight(pair) > 0 and not others
                assert full or snap.admissions or busy, (seed, free, snap.resumes)
                yielded += not full and not snap.admissions
        assert not pair.live(), seed
    assert waited > 100 and yielded > 10, (waited, yielded)  # both rules were tested
