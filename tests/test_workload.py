"""The adaptive round-0 size, and the workload replay that compares landing designs."""

from __future__ import annotations

import itertools

import pytest

from resumekit import BlockAllocator, BlockBuffers, EmbeddingTensors, InvalidArgumentError
from resumekit.simulate import Loopback
from resumekit.statemachine.sizing import MIN_SAMPLES, AutoSizer
from resumekit.workload import DESIGNS, CostModel, make_trace, quantile, run

# -- AutoSizer ---------------------------------------------------------------------------


def sizer(**kwargs: object) -> AutoSizer:
    args: dict[str, object] = {"fallback": 8192, "resume_tokens": None} | kwargs
    return AutoSizer(128, 32_768, **args)  # type: ignore[arg-type]


def test_a_hint_uses_the_fixed_default_until_it_has_enough_sizes() -> None:
    s = sizer()
    for _ in range(MIN_SAMPLES - 1):
        s.observe("image", 300)
    assert s.choose("image") == 8192
    s.observe("image", 300)
    assert s.choose("image") == 384  # whole blocks covering every size seen
    assert s.choose("video") == 8192  # each hint learns on its own


def test_the_choice_covers_sizes_just_above_the_default() -> None:
    s = sizer()
    for i in range(MIN_SAMPLES):
        s.observe(None, 8193 + i)
    assert s.choose(None) == 8192 + 128  # one round each, instead of two


def test_the_choice_never_needs_more_rounds_than_the_fixed_default() -> None:
    sizes = [256 + 97 * i for i in range(40)]  # all fit the fixed default
    best = sizer().best(sizes)
    assert best >= max(sizes)  # still one round each, with less over-allocation
    assert best < 8192


def test_a_heavy_tail_is_covered_only_as_far_as_the_waste_bound_allows() -> None:
    sizes = [10_000] * 30 + [30_000] * 2
    tight = sizer(waste=0.05).best(sizes)
    loose = sizer(waste=10.0).best(sizes)
    assert tight == 10_112  # the bulk, in one round; the tail resumes
    assert loose == 30_080  # everything in one round
    assert sizer().best([40_000] * 20) == 8192  # two rounds either way: the smaller
    assert sizer(resume_tokens=8192).best([40_000] * 20) == 32_768  # 2 rounds, not 5: capped
    assert sizer(waste=0.0).best(sizes) == 8192  # no waste allowed: what the default does


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"waste": -1}, "waste must be a number in"),
        ({"waste": True}, "waste must be a number in"),
        ({"min_samples": 0}, "min_samples must be >= 1"),
        ({"fallback": 0}, "fallback must be >= 1"),
    ],
)
def test_bad_sizer_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        sizer(**kwargs)


def test_the_receiver_sizes_round_zero_from_what_it_learned() -> None:
    pair = Loopback(pool_blocks=256, block_size=128, hidden=4, default_allocate="auto")
    receiver = pair.receiver
    assert receiver.sizer is not None
    for i in range(MIN_SAMPLES):
        rid = ("warm", i)
        receiver.add(rid, size_hint="image")
        pair.sender.add(rid, pair.sources.setdefault(rid, _src(pair, 500)))
    finished: list[object] = []
    for _ in range(100):
        finished += receiver.step()
        pair.sender.step()
    assert len(finished) == MIN_SAMPLES
    for i in range(MIN_SAMPLES):
        assert receiver.take(("warm", i)).ok
    receiver.add("next", size_hint="image")
    receiver.add("other", size_hint="video")
    receiver.step()  # admits both
    record = receiver.record("next")
    assert record.allocation is not None and record.allocation.capacity_tokens == 512
    other = receiver.record("other")
    assert other.allocation is not None and other.allocation.capacity_tokens == 8192


def _src(pair: Loopback, tokens: int) -> EmbeddingTensors:
    from resumekit.simulate import random_source

    return random_source(tokens, pair.buffers.hidden_size, seed=tokens)


def test_auto_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", "auto")
    pair = Loopback(pool_blocks=16, block_size=128, hidden=4, default_allocate=None)
    assert pair.receiver.sizer is not None
    assert pair.receiver.default_allocate_tokens == 2048  # the pool, when under 8192
    with pytest.raises(InvalidArgumentError, match="size_hint must be hashable"):
        pair.receiver.add("x", size_hint=[])  # type: ignore[arg-type]
    assert "x" not in pair.receiver


def test_a_fixed_receiver_has_no_sizer() -> None:
    buffers = BlockBuffers(BlockAllocator(64, 128), 4, device="cpu")
    assert Loopback(pool_blocks=64, default_allocate=8192).receiver.sizer is None
    assert buffers.num_blocks == 64


# -- the workload replay -----------------------------------------------------------------


def test_traces_are_seeded_and_poisson_at_the_asked_load() -> None:
    cost = CostModel()
    a = make_trace("video-mixed", 400, 0.5, cost, seed=3)
    assert a == make_trace("video-mixed", 400, 0.5, cost, seed=3)
    assert a != make_trace("video-mixed", 400, 0.5, cost, seed=4)
    assert all(x.arrival < y.arrival for x, y in itertools.pairwise(a))
    busy = sum(cost.transfer(x.tokens) for x in a)
    assert 0.35 < busy / a[-1].arrival < 0.7  # offered load near 0.5 of the link
    assert max(x.tokens for x in a) > 131_072  # some larger than the default pool
    adversarial = make_trace("adversarial", 50, 0.5, cost, seed=0)
    assert all(8192 < x.tokens <= 8448 for x in adversarial)


@pytest.mark.parametrize("design", DESIGNS)
def test_every_design_replays_the_same_trace_deterministically(design: str) -> None:
    first = run(design, "video-mixed", requests=80, load=0.6, seed=1)  # type: ignore[arg-type]
    again = run(design, "video-mixed", requests=80, load=0.6, seed=1)  # type: ignore[arg-type]
    assert first == again
    assert first.completed + first.failed + first.stuck == 80
    assert 0 <= first.occupancy <= 1 and 0 <= first.waste <= first.occupancy


def test_resumekit_completes_what_size_first_must_refuse() -> None:
    ours = run("resumekit", "video-mixed", requests=150, load=0.6, seed=2)
    theirs = run("size-first", "video-mixed", requests=150, load=0.6, seed=2)
    assert ours.completed == 150 and ours.failed == ours.stuck == 0
    assert theirs.failed > 0
    assert set(theirs.failures) == {"larger than the pool: raise SGLANG_EMBEDDING_POOL_SIZE_MB"}
    assert ours.rounds > 1.0 and theirs.rounds == 1.0


def test_size_first_pays_one_round_trip_more_before_the_first_byte() -> None:
    cost = CostModel(rtt=1e-3)
    ours = run("resumekit", "image-heavy", requests=60, load=0.05, cost=cost)
    theirs = run("size-first", "image-heavy", requests=60, load=0.05, cost=cost)
    assert theirs.p50 is not None and ours.p50 is not None
    assert theirs.p50 - ours.p50 == pytest.approx(cost.rtt, rel=0.2)


def test_auto_needs_fewer_rounds_than_the_fixed_default_just_above_it() -> None:
    fixed = run("resumekit", "adversarial", requests=120, load=0.5)
    auto = run("resumekit-auto", "adversarial", requests=120, load=0.5)
    assert fixed.rounds == 2.0
    assert auto.rounds < 1.2


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.5) is None
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
