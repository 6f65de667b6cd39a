from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import resumekit
from resumekit import (
    Allocation,
    BlockAllocator,
    CapacityExceededError,
    DoubleFreeError,
    ForeignAllocationError,
    InvalidArgumentError,
    InvariantError,
    LeakError,
    ResumeKitError,
    UseAfterFreeError,
)


def state(a: BlockAllocator) -> tuple[object, ...]:
    """Everything observable about an allocator's bookkeeping."""
    return (
        tuple(a._free.snapshot()),
        tuple(id(x) for x in a.outstanding()),
        a.next_generation,
        a.num_free_blocks,
        {o: tuple(d) for o, d in a._by_owner.items()},
    )


@contextmanager
def unchanged(a: BlockAllocator) -> Iterator[None]:
    before = state(a)
    yield
    assert state(a) == before
    a.check_invariants()


@pytest.fixture(params=["lifo", "fifo"])
def pool(request: pytest.FixtureRequest) -> BlockAllocator:
    return BlockAllocator(8, 4, reuse=request.param)


# -- happy paths ---------------------------------------------------------------


def test_allocate_rounds_up_and_fills_in_order(pool: BlockAllocator) -> None:
    a = pool.allocate(9, "r")
    assert a is not None
    # LIFO hands out the top of its stack (the highest blocks), FIFO the head of its queue.
    assert a.blocks == ((5, 6, 7) if pool.reuse == "lifo" else (0, 1, 2))
    assert a.capacity_tokens == 12
    assert a.owner == "r"
    assert pool.num_free_blocks == 5
    assert pool.outstanding() == (a,)
    pool.check_invariants()


def test_allocate_is_all_or_nothing(pool: BlockAllocator) -> None:
    a = pool.allocate(24, "r")
    assert a is not None
    with unchanged(pool):
        assert pool.allocate(12, "s") is None
    assert pool.allocate(8, "s") is not None
    assert pool.num_free_blocks == 0


def test_generations_strictly_increase_and_are_never_reused(pool: BlockAllocator) -> None:
    seen = []
    for _ in range(20):
        a = pool.allocate(32, "r")
        assert a is not None
        seen.append(a.generation)
        pool.free(a)
    assert seen == sorted(set(seen))


def test_lifo_hands_back_the_same_blocks() -> None:
    pool = BlockAllocator(8, 4, reuse="lifo")
    first = pool.allocate(8, "r")
    assert first is not None
    pool.free(first)
    second = pool.allocate(8, "r")
    assert second is not None
    assert second.blocks == first.blocks
    assert second.generation != first.generation
    assert second is not first
    assert second != first


def test_lifo_most_recently_freed_first() -> None:
    pool = BlockAllocator(8, 1, reuse="lifo")
    a, b = pool.allocate(2, "a"), pool.allocate(2, "b")
    assert a is not None and b is not None
    pool.free(a)
    pool.free(b)
    c = pool.allocate(2, "c")
    d = pool.allocate(2, "d")
    assert c is not None and d is not None
    assert c.blocks == b.blocks
    assert d.blocks == a.blocks


def test_fifo_hands_out_the_longest_free_first() -> None:
    pool = BlockAllocator(4, 1, reuse="fifo")
    a = pool.allocate(2, "a")
    assert a is not None and a.blocks == (0, 1)
    pool.free(a)
    b = pool.allocate(3, "b")
    assert b is not None and b.blocks == (2, 3, 0)


def test_fifo_compaction_keeps_order() -> None:
    pool = BlockAllocator(3000, 1, reuse="fifo")
    expected = list(range(3000))
    for _ in range(40):
        a = pool.allocate(700, "r")
        assert a is not None
        assert list(a.blocks) == expected[:700]
        expected = expected[700:] + expected[:700]
        pool.free(a)
        pool.check_invariants()


def test_fifo_free_list_memory_stays_bounded_over_many_rounds() -> None:
    """A FIFO pool's free list compacts: 50,000 allocate/free rounds leave no growing queue."""
    pool = BlockAllocator(4, 1, reuse="fifo")

    def rounds(n: int) -> None:
        for _ in range(n):
            got = pool.allocate(1, "r")
            assert got is not None
            pool.free(got)

    tracemalloc.start()
    try:
        rounds(3000)  # past the first compaction: the queue at its steady size
        before = tracemalloc.get_traced_memory()[0]
        rounds(50_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000  # a queue never compacted holds 50,000 more entries (400 kB)
    assert pool.num_free_blocks == 4
    pool.check_invariants()


def test_allocate_up_to_takes_what_is_free(pool: BlockAllocator) -> None:
    held = pool.allocate(20, "x")  # 5 of 8 blocks
    assert held is not None
    a = pool.allocate_up_to(100, "r")
    assert a is not None and len(a.blocks) == 3 and a.capacity_tokens == 12
    pool.free(a)
    b = pool.allocate_up_to(5, "r")
    assert b is not None and len(b.blocks) == 2


def test_allocate_up_to_respects_min_tokens(pool: BlockAllocator) -> None:
    held = pool.allocate(24, "x")  # 2 blocks left
    assert held is not None
    with unchanged(pool):
        assert pool.allocate_up_to(100, "r", min_tokens=9) is None
    a = pool.allocate_up_to(100, "r", min_tokens=8)
    assert a is not None and len(a.blocks) == 2
    with unchanged(pool):
        assert pool.allocate_up_to(100, "r") is None


def test_free_owner_frees_all_and_is_idempotent(pool: BlockAllocator) -> None:
    for _ in range(3):
        assert pool.allocate(4, "r") is not None
    other = pool.allocate(4, "s")
    assert pool.free_owner("r") == 3
    assert pool.free_owner("r") == 0
    assert pool.outstanding() == (other,)
    assert pool.outstanding_of("r") == ()
    pool.check_invariants()


def test_owner_may_be_any_hashable(pool: BlockAllocator) -> None:
    a = pool.allocate(1, ("req", 7))
    assert a is not None
    assert pool.outstanding_of(("req", 7)) == (a,)


def test_large_pool_works() -> None:
    pool = BlockAllocator(1 << 20, 16)
    a = pool.allocate(64 * 16, "r")
    assert a is not None and a.blocks == tuple(range((1 << 20) - 64, 1 << 20))
    pool.free(a)
    pool.check_quiescent()


# -- errors leave everything unchanged -----------------------------------------


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "4", None])
def test_allocate_rejects_bad_num_tokens(pool: BlockAllocator, bad: object) -> None:
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate(bad, "r")  # type: ignore[arg-type]
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate_up_to(bad, "r")  # type: ignore[arg-type]


def test_impossible_request_raises_instead_of_none(pool: BlockAllocator) -> None:
    with unchanged(pool), pytest.raises(CapacityExceededError):
        pool.allocate(33, "r")
    with unchanged(pool), pytest.raises(CapacityExceededError):
        pool.allocate_up_to(100, "r", min_tokens=33)
    assert issubclass(CapacityExceededError, ResumeKitError)


def test_allocate_up_to_rejects_min_above_num(pool: BlockAllocator) -> None:
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate_up_to(4, "r", min_tokens=5)
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate_up_to(4, "r", min_tokens=0)


def test_unhashable_owner_is_rejected(pool: BlockAllocator) -> None:
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate(4, ["list"])
    with unchanged(pool), pytest.raises(InvalidArgumentError):
        pool.allocate_up_to(4, {"d": 1})
    with unchanged(pool), pytest.raises(InvalidArgumentError, match="owner must be hashable"):
        pool.free_owner([1])
    with pytest.raises(InvalidArgumentError, match="owner must be hashable, not list"):
        pool.outstanding_of([1])


def test_double_free(pool: BlockAllocator) -> None:
    a = pool.allocate(4, "r")
    b = pool.allocate(4, "r")
    assert a is not None and b is not None
    pool.free(a)
    with unchanged(pool), pytest.raises(DoubleFreeError) as info:
        pool.free(a)
    assert info.value.allocation is a
    assert "already freed" in str(info.value)


def test_double_free_after_blocks_were_reused(pool: BlockAllocator) -> None:
    a = pool.allocate(32, "r")
    assert a is not None
    pool.free(a)
    b = pool.allocate(32, "s")  # same blocks, new generation
    assert b is not None and set(b.blocks) == set(a.blocks)
    with unchanged(pool), pytest.raises(DoubleFreeError):
        pool.free(a)
    assert pool.outstanding() == (b,)


def test_foreign_allocation(pool: BlockAllocator) -> None:
    other = BlockAllocator(8, 4, reuse=pool.reuse)
    mine = pool.allocate(4, "r")
    theirs = other.allocate(4, "r")
    assert mine is not None and theirs is not None
    assert mine.blocks == theirs.blocks and mine.generation == theirs.generation
    with unchanged(pool), pytest.raises(ForeignAllocationError) as error:
        pool.free(theirs)
    assert str(error.value) == (
        f"allocation generation {theirs.generation} of owner 'r' was not issued by this allocator"
    )
    pool.free(mine)


def test_forged_allocation(pool: BlockAllocator) -> None:
    a = pool.allocate(8, "r")
    assert a is not None
    forged = Allocation(a.blocks, a.capacity_tokens, a.owner, a.generation)
    with unchanged(pool), pytest.raises(ForeignAllocationError):
        pool.free(forged)
    copied = Allocation(a.blocks, a.capacity_tokens, a.owner, a.generation, a._pool_id)
    with unchanged(pool), pytest.raises(ForeignAllocationError) as error:
        pool.free(copied)
    assert str(error.value) == (
        f"allocation generation {a.generation} of owner 'r' "
        "is a copy, not the allocation this allocator issued"
    )
    future = Allocation((5,), 4, "r", 99, a._pool_id)
    with unchanged(pool), pytest.raises(ForeignAllocationError):
        pool.free(future)
    # The very next generation has not been issued either: a copy, not a double free.
    upcoming = Allocation((5,), 4, "r", pool.next_generation, a._pool_id)
    with unchanged(pool), pytest.raises(ForeignAllocationError, match="is a copy"):
        pool.free(upcoming)
    pool.free(a)
    # A copy rebuilt after the original was freed is still a copy (it read as a double free).
    rebuilt = Allocation(a.blocks, a.capacity_tokens, a.owner, a.generation, a._pool_id)
    with unchanged(pool), pytest.raises(ForeignAllocationError, match="is a copy"):
        pool.free(rebuilt)
    with unchanged(pool), pytest.raises(ForeignAllocationError, match="is a copy"):
        pool.check_live(rebuilt)
    with unchanged(pool), pytest.raises(DoubleFreeError):
        pool.free(a)


def test_an_unhashable_generation_is_a_typed_error(pool: BlockAllocator) -> None:
    """It raised TypeError from the dict lookup."""
    a = pool.allocate(4, "r")
    assert a is not None
    forged = Allocation(a.blocks, a.capacity_tokens, a.owner, [0], a._pool_id)  # type: ignore[arg-type]
    for call in (pool.free, pool.check_live):
        with unchanged(pool), pytest.raises(ForeignAllocationError, match="int generations"):
            call(forged)
    assert not pool.is_live(forged)
    pool.free(a)


@pytest.mark.parametrize("bad", [None, (0, 1), "alloc", 3])
def test_free_rejects_non_allocations(pool: BlockAllocator, bad: object) -> None:
    expected = f"allocation must be an Allocation, not {type(bad).__name__}"
    with unchanged(pool), pytest.raises(InvalidArgumentError, match=expected):
        pool.free(bad)  # type: ignore[arg-type]


def test_check_live(pool: BlockAllocator) -> None:
    a = pool.allocate(4, "r")
    assert a is not None
    assert pool.check_live(a) is a and pool.is_live(a)
    pool.free(a)
    assert not pool.is_live(a)
    with pytest.raises(UseAfterFreeError, match=rf"blocks \[{a.blocks[0]}\]\) has been freed"):
        pool.check_live(a)
    with pytest.raises(InvalidArgumentError):
        pool.check_live("nope")


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockAllocator(0, 4),
        lambda: BlockAllocator(4, 0),
        lambda: BlockAllocator(-1, 4),
        lambda: BlockAllocator(4, 4, reuse="random"),  # type: ignore[arg-type]
        lambda: BlockAllocator(4.0, 4),  # type: ignore[arg-type]
    ],
)
def test_constructor_rejects_bad_arguments(make: Callable[[], BlockAllocator]) -> None:
    with pytest.raises(InvalidArgumentError):
        make()


# -- leak and invariant checks ---------------------------------------------------


def test_check_quiescent_names_each_leak(pool: BlockAllocator) -> None:
    pool.check_quiescent()
    a = pool.allocate(5, "req-1")
    b = pool.allocate(1, ("req", 2))
    assert a is not None and b is not None
    with pytest.raises(LeakError) as info:
        pool.check_quiescent()
    assert info.value.leaks == (a, b)
    assert info.value.owners == ("req-1", ("req", 2))
    text = str(info.value)
    assert "'req-1'" in text and f"generation {a.generation}" in text
    assert str(list(a.blocks)) in text
    pool.free_owner("req-1")
    pool.free(b)
    pool.check_quiescent()


def test_check_invariants_detects_a_shared_block() -> None:
    pool = BlockAllocator(4, 1)
    a = pool.allocate(1, "r")
    assert a is not None
    pool._free.give((a.blocks[0],))  # corrupt: block both free and allocated
    with pytest.raises(InvariantError, match=f"block {a.blocks[0]}"):
        pool.check_invariants()


def test_check_invariants_detects_a_duplicate_in_the_free_list() -> None:
    pool = BlockAllocator(4, 1, reuse="fifo")
    pool._free.give((2,))
    with pytest.raises(InvariantError, match="twice"):
        pool.check_invariants()


def test_check_invariants_detects_a_lost_block() -> None:
    pool = BlockAllocator(4, 1)
    pool._free.take(1)
    with pytest.raises(InvariantError, match="free count"):
        pool.check_invariants()
    pool._num_free -= 1
    with pytest.raises(InvariantError, match="neither free nor allocated"):
        pool.check_invariants()


def test_errors_are_exported_from_the_package() -> None:
    for name in (
        "DoubleFreeError",
        "ForeignAllocationError",
        "LeakError",
        "CapacityExceededError",
        "InvalidArgumentError",
        "UseAfterFreeError",
    ):
        assert issubclass(getattr(resumekit, name), ResumeKitError)


# -- check_invariants: each corruption of the bookkeeping is named exactly --------------


def _corruptible(reuse: str = "lifo") -> tuple[BlockAllocator, Allocation, Allocation]:
    a = BlockAllocator(6, 4, reuse=reuse)  # type: ignore[arg-type]
    x = a.allocate(8, "x")
    y = a.allocate(4, "y")
    assert x is not None and y is not None
    return a, x, y


def _stack(a: BlockAllocator) -> list[int]:
    return a._free._stack  # type: ignore[union-attr]


CORRUPTIONS: list[tuple[str, Callable[[BlockAllocator, Allocation, Allocation], str]]] = []


def corruption(
    fn: Callable[[BlockAllocator, Allocation, Allocation], str],
) -> Callable[[BlockAllocator, Allocation, Allocation], str]:
    CORRUPTIONS.append((fn.__name__, fn))
    return fn


@corruption
def free_block_past_the_pool(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    _stack(a).append(6)
    return "free list holds out-of-range block 6"


@corruption
def free_block_below_zero(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    _stack(a).insert(0, -1)
    return "free list holds out-of-range block -1"


@corruption
def free_block_twice(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    block = _stack(a)[-1]
    _stack(a).append(block)
    return f"block {block} is in the free list twice"


@corruption
def generation_renamed(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    x._generation = 5
    return "live map out of order at generation 0"


@corruption
def generation_negative(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    x._generation = -1  # re-keyed everywhere: only the value is wrong
    a._live = {-1: x, 1: y}
    a._by_owner["x"] = {-1: x}
    return "live map out of order at generation -1"


@corruption
def live_map_reordered(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._live = {1: y, 0: x}
    return "live map out of order at generation 0"


@corruption
def generation_never_issued(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._next_generation = 1
    return "generation 1 was never issued"


@corruption
def owner_index_holds_another(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._by_owner["y"][1] = x
    return "generation 1 missing from its owner's index"


@corruption
def owner_not_indexed(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    del a._by_owner["y"]
    return "generation 1 missing from its owner's index"


@corruption
def wrong_capacity(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    y._capacity_tokens = 8
    return "generation 1 has a wrong capacity"


@corruption
def allocated_block_past_the_pool(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    y._blocks = (6,)
    return "generation 1 holds out-of-range block 6"


@corruption
def allocated_block_below_zero(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    y._blocks = (-1,)
    return "generation 1 holds out-of-range block -1"


@corruption
def allocated_and_free(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    block = _stack(a)[0]
    y._blocks = (block,)
    return f"block {block} is in generation 1 and also free"


@corruption
def allocated_twice(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    y._blocks = (x.blocks[1],)
    return f"block {x.blocks[1]} is in generation 1 and also generation 0"


@corruption
def empty_owner_indexed(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._by_owner["z"] = {}
    return "an owner with no allocations is still indexed"


@corruption
def owner_index_larger(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._by_owner["z"] = {7: x}
    return "owner index and live map disagree"


@corruption
def free_count_off(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    a._num_free += 1
    return "free count says 4; the free list holds 3"


@corruption
def block_lost(a: BlockAllocator, x: Allocation, y: Allocation) -> str:
    block = _stack(a).pop()
    a._num_free -= 1
    return f"blocks neither free nor allocated: [{block}]"


@pytest.mark.parametrize(("name", "corrupt"), CORRUPTIONS, ids=[n for n, _ in CORRUPTIONS])
def test_check_invariants_names_each_corruption(
    name: str, corrupt: Callable[[BlockAllocator, Allocation, Allocation], str]
) -> None:
    a, x, y = _corruptible()
    a.check_invariants()
    message = corrupt(a, x, y)
    with pytest.raises(InvariantError) as error:
        a.check_invariants()
    assert str(error.value) == message


@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
def test_check_invariants_accepts_block_zero_free_or_allocated(reuse: str) -> None:
    a, x, y = _corruptible(reuse)
    held = {*x.blocks, *y.blocks}
    assert (0 in held) is (reuse == "fifo")  # LIFO hands out the top blocks first
    a.check_invariants()
    a.free(x)
    a.check_invariants()


def test_check_invariants_lists_the_first_16_lost_blocks() -> None:
    a = BlockAllocator(20, 4)
    _stack(a).clear()
    a._num_free = 0
    with pytest.raises(InvariantError) as error:
        a.check_invariants()
    assert str(error.value) == f"blocks neither free nor allocated: {list(range(16))}"
