"""``snapshot()`` and ``restore()`` of the receiver, sender and allocator: what a checker
reads and copies instead of their private fields."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from resumekit import BlockAllocator, InvalidArgumentError, TransferState
from resumekit.allocator import AllocatorSnapshot, EmbeddingTensors
from resumekit.protocol import ReceiverSnapshot, SenderSnapshot
from resumekit.protocol.receiver import RecordState
from resumekit.transports.inprocess import Loopback


def pair() -> Loopback:
    return Loopback(pool_blocks=8, block_size=4, hidden=2, default_allocate=8)


def mid_transfer() -> Loopback:
    """Two requests under way, one waiting for its source, a status in flight."""
    p = pair()
    p.add("a", 30, seed=1)
    p.add("b", 9, seed=2)
    p.receiver.add("c")  # its source comes later: its round 0 is parked at the sender
    for _ in range(3):
        p.step()
    return p


def test_a_restored_pair_finishes_as_the_original_does() -> None:
    p = mid_transfer()
    r, s, a = p.receiver.snapshot(), p.sender.snapshot(), p.allocator.snapshot()
    in_flight, posts = list(p.transport.in_flight), list(p.transport.posts)
    assert {rec.rid for rec in r.records} == {"a", "b", "c"}
    assert s.parked and p.sender.parked_posts == 1

    def finish() -> tuple[Any, ...]:
        p.sender.add("c", p.sources["a"].narrow(0, 5))
        p.run(200)
        results = {rid: p.receiver.take(rid) for rid in ("a", "b", "c")}
        return tuple((rid, x.state, x.rounds, x.output.num_tokens) for rid, x in results.items())  # type: ignore[union-attr]

    first = finish()
    assert p.allocator.num_free_blocks == p.allocator.num_blocks
    p.allocator.restore(a)
    p.receiver.restore(r)
    p.sender.restore(s)
    p.transport.in_flight, p.transport.posts = list(in_flight), type(p.transport.posts)(posts)
    assert p.receiver.snapshot() is r and p.sender.snapshot() is s  # the very state
    assert finish() == first


def test_a_restored_request_keeps_its_size_hint_for_the_auto_sizer() -> None:
    p = Loopback(pool_blocks=8, block_size=4, hidden=2, default_allocate="auto")
    p.receiver.add("v", size_hint="video")
    p.sources["v"] = EmbeddingTensors.random(20, 2, seed=1)
    p.sender.add("v", p.sources["v"])
    p.step()
    r, s, a = p.receiver.snapshot(), p.sender.snapshot(), p.allocator.snapshot()
    in_flight, posts = list(p.transport.in_flight), list(p.transport.posts)

    def finish() -> object:
        p.run(200)
        assert p.receiver.take("v").state is TransferState.Success
        assert p.receiver.sizer is not None
        return p.receiver.sizer.snapshot()

    first = finish()
    assert [h for h, _ in first.sizes] == ["video"]  # type: ignore[attr-defined]
    p.allocator.restore(a)
    p.receiver.restore(r)
    p.sender.restore(s)
    p.transport.in_flight, p.transport.posts = list(in_flight), type(p.transport.posts)(posts)
    assert finish() == first  # learned under its hint again, not under None


def test_a_snapshot_is_a_value_and_changes_with_every_change() -> None:
    p = pair()
    snaps = [p.receiver.snapshot()]
    assert p.receiver.snapshot() is snaps[0]  # nothing changed: the same object
    p.add("a", 9, seed=1)
    for _ in range(4):
        snaps.append(p.receiver.snapshot())
        p.step()
    snaps.append(p.receiver.snapshot())
    p.receiver.take("a")
    snaps.append(p.receiver.snapshot())
    # The same object while nothing changed, a new one (and another value) when it did.
    for x, y in itertools.pairwise(snaps):
        assert (x is y) == (x == y)
    assert len({id(x) for x in snaps}) >= 4
    assert snaps[-1].records == () and hash(snaps[-1].finished) is not None


@pytest.mark.parametrize("mutate", ["add", "abort", "take", "step", "bootstrapped"])
def test_every_receiver_change_invalidates_its_snapshot(mutate: str) -> None:
    p = pair()
    p.receiver.add("w", bootstrapped=False)
    p.receiver.add("x")
    p.receiver.abort("x")
    p.add("y", 9)
    before = p.receiver.snapshot()
    calls = {
        "add": lambda: p.receiver.add("z"),
        "abort": lambda: p.receiver.abort("y"),
        "take": lambda: p.receiver.take("x"),
        "step": lambda: (p.sender.step(), p.receiver.step()),
        "bootstrapped": lambda: p.receiver.bootstrapped("w"),
    }
    calls[mutate]()
    after = p.receiver.snapshot()
    assert isinstance(after, ReceiverSnapshot)  # recomputed, not a stale placeholder
    assert after is not before and after != before


def test_every_sender_and_allocator_change_invalidates_its_snapshot() -> None:
    p = pair()
    s0, a0 = p.sender.snapshot(), p.allocator.snapshot()
    p.sender.add("a", p.buffers.new_output(3))
    s1 = p.sender.snapshot()
    assert s1 is not s0 and s1.lives
    p.receiver.add("a")
    p.receiver.step()  # admits it: round 0's blocks
    a1 = p.allocator.snapshot()
    assert a1 is not a0 and len(a1.live) == 1
    p.sender.step()
    assert p.sender.snapshot() is not s1
    alloc = BlockAllocator(4, 1)
    x = alloc.snapshot()
    got = alloc.allocate(2, "o")
    y = alloc.snapshot()
    assert y is not x and y.live == (got,)
    assert got is not None
    alloc.free(got)
    assert alloc.snapshot() is not y and alloc.snapshot().free != y.free


def test_the_allocator_rewinds_to_its_snapshot() -> None:
    for reuse in ("lifo", "fifo"):
        alloc = BlockAllocator(6, 2, reuse=reuse)  # type: ignore[arg-type]
        keep = alloc.allocate(4, "k")
        before = alloc.snapshot()
        taken = [alloc.allocate(2, i) for i in range(3)]
        seen = [t.blocks for t in taken if t is not None]
        alloc.restore(before)
        again = [alloc.allocate(2, i) for i in range(3)]
        assert [t.blocks for t in again if t is not None] == seen
        assert [t.generation for t in again if t is not None] == [
            t.generation for t in taken if t is not None
        ]
        with pytest.raises(Exception, match="copy, not the allocation"):
            alloc.free(taken[0])  # type: ignore[arg-type]
        alloc.check_invariants()
        assert keep is not None and alloc.is_live(keep)


def _forged_records(snap: ReceiverSnapshot) -> ReceiverSnapshot:
    rec = snap.records[0]
    return snap._replace(records=(rec, rec._replace()))


BAD_RECEIVER: list[tuple[str, Any, str]] = [
    ("not a snapshot", lambda s, p: ("records",), "ReceiverSnapshot"),
    ("a sender's", lambda s, p: p.sender.snapshot(), "ReceiverSnapshot"),
    ("a request twice", lambda s, p: _forged_records(s), "twice"),
    ("a record of another kind", lambda s, p: s._replace(records=((1, 2),)), "RecordState"),
    (
        "an allocation freed since",
        lambda s, p: s._replace(quarantine=((("x", 1, 0), _freed(p)),)),
        "not live",
    ),
]


def _freed(p: Loopback) -> object:
    got = p.allocator.allocate(1, "gone")
    assert got is not None
    p.allocator.free(got)
    return got


@pytest.mark.parametrize(("name", "make", "words"), BAD_RECEIVER, ids=[b[0] for b in BAD_RECEIVER])
def test_the_receiver_refuses_a_snapshot_it_cannot_hold_and_changes_nothing(
    name: str, make: Any, words: str
) -> None:
    p = mid_transfer()
    before = p.receiver.snapshot()
    bad = make(before, p)
    with pytest.raises(InvalidArgumentError, match=words):
        p.receiver.restore(bad)
    assert p.receiver.snapshot() == before


def test_the_sender_and_allocator_refuse_what_they_cannot_hold_and_change_nothing() -> None:
    p = mid_transfer()
    s, a = p.sender.snapshot(), p.allocator.snapshot()
    cases: list[tuple[Any, Any, str]] = [
        (p.sender, a, "SenderSnapshot"),
        (p.sender, s._replace(lives=(("a", ("x",)),)), "SourceState"),
        (p.sender, s._replace(parked=(("a", ("post",)),)), "RoundPost"),
        (p.allocator, s, "AllocatorSnapshot"),
        (p.allocator, BlockAllocator(8, 4).snapshot(), "another allocator"),
        (p.allocator, a._replace(free=a.free[1:]), "every block"),
        (p.allocator, a._replace(free=(*a.free[1:], a.free[1])), "every block"),
        (p.allocator, a._replace(free=(*a.free[1:], 99)), "every block"),
        (p.allocator, a._replace(live=a.live[::-1]), "generation order"),
        (p.allocator, a._replace(next_generation=0), "every block"),
        (p.allocator, a._replace(live=("x",)), "not an allocation"),
    ]
    assert len(a.live) > 1
    for obj, bad, words in cases:
        with pytest.raises(InvalidArgumentError, match=words):
            obj.restore(bad)
    assert p.sender.snapshot() == s and p.allocator.snapshot() == a
    p.allocator.check_invariants()


def test_snapshot_types_are_the_documented_values() -> None:
    p = mid_transfer()
    r, s, a = p.receiver.snapshot(), p.sender.snapshot(), p.allocator.snapshot()
    assert isinstance(r, ReceiverSnapshot) and isinstance(s, SenderSnapshot)
    assert isinstance(a, AllocatorSnapshot) and all(isinstance(x, RecordState) for x in r.records)
    # The queues hold the very record states of `records` for requests still known.
    known = {id(x) for x in r.records}
    assert all(id(x) in known for x in (*r.admissions, *r.resumes) if x.rid in {"a", "b", "c"})


@pytest.mark.parametrize("bad", [None, "records", 3])
def test_restore_of_a_non_snapshot_names_its_type_even_before_any_snapshot(bad: object) -> None:
    """restore() of a non-snapshot on an object never snapshotted raises, naming the type."""
    fresh = pair()  # nothing has taken a snapshot of any of its three parts yet
    objects: list[tuple[Any, str]] = [
        (BlockAllocator(4, 1), "an AllocatorSnapshot"),
        (fresh.sender, "a SenderSnapshot"),
        (fresh.receiver, "a ReceiverSnapshot"),
    ]
    for obj, kind in objects:
        with pytest.raises(InvalidArgumentError) as error:
            obj.restore(bad)
        assert str(error.value) == f"snapshot must be {kind}, not {type(bad).__name__}"


def test_each_refused_snapshot_is_named_exactly() -> None:
    """The allocator's and the sender's refusals say exactly what is wrong, and change nothing."""
    p = mid_transfer()
    s, a = p.sender.snapshot(), p.allocator.snapshot()
    every_block = "snapshot does not hold every block of the pool exactly once, in range"
    cases: list[tuple[Any, Any, str]] = [
        (p.allocator, BlockAllocator(8, 4).snapshot(), "snapshot was taken of another allocator"),
        (
            p.allocator,
            a._replace(live=a.live[::-1]),
            "snapshot's allocations are not in generation order",
        ),
        (p.allocator, a._replace(free=a.free[1:]), every_block),
        (
            p.sender,
            s._replace(parked=(("a", ("post",)),)),  # type: ignore[arg-type]
            "snapshot parks something that is not a RoundPost",
        ),
    ]
    for obj, bad, message in cases:
        with pytest.raises(InvalidArgumentError) as error:
            obj.restore(bad)
        assert str(error.value) == message
    assert p.sender.snapshot() == s and p.allocator.snapshot() == a


def test_the_allocator_refuses_each_flaw_of_a_snapshot_on_its_own() -> None:
    """A block out of range, or a next generation not past the newest live one, alone is refused."""
    p = mid_transfer()
    a = p.allocator.snapshot()
    newest = a.live[-1].generation
    assert a.next_generation > newest
    flawed = [
        a._replace(free=(*a.free[1:], 99)),  # one block out of range, the generations sound
        a._replace(next_generation=0),  # generations unsound, every block in range
        a._replace(next_generation=newest),  # the next allocation would reuse `newest`
    ]
    for bad in flawed:
        with pytest.raises(InvalidArgumentError, match="every block"):
            p.allocator.restore(bad)
        assert p.allocator.snapshot() == a
    p.allocator.restore(a._replace(next_generation=newest + 1))  # the least it may be
    assert p.allocator.next_generation == newest + 1
    p.allocator.check_invariants()


def test_the_allocator_refuses_two_allocations_of_one_generation() -> None:
    """A snapshot naming two allocations of the same generation (two timelines) is refused."""
    alloc = BlockAllocator(4, 1)
    start = alloc.snapshot()
    alloc.allocate(1, "p")
    first = alloc.allocate(1, "q")  # generation 1, block 2
    alloc.restore(start)
    p2 = alloc.allocate(1, "p")
    assert p2 is not None
    alloc.free(p2)
    second = alloc.allocate(1, "q")  # generation 1 again, on another timeline: block 3
    assert first is not None and second is not None
    assert first.generation == second.generation and first.blocks != second.blocks
    now = alloc.snapshot()
    bad = now._replace(free=tuple(sorted({0, 1, 2, 3} - {*first.blocks, *second.blocks})))
    bad = bad._replace(live=(first, second))  # every block exactly once: only the order is off
    with pytest.raises(InvalidArgumentError, match="not in generation order"):
        alloc.restore(bad)
    assert alloc.snapshot() == now
    alloc.check_invariants()


def test_after_restore_the_allocator_snapshot_is_the_restored_value_itself() -> None:
    """restore(x) leaves the allocator's snapshot() returning x itself, not an equal copy."""
    for reuse in ("lifo", "fifo"):
        alloc = BlockAllocator(4, 1, reuse=reuse)
        before = alloc.snapshot()
        assert alloc.allocate(2, "x") is not None
        alloc.restore(before)
        assert alloc.snapshot() is before
        alloc.restore(before)  # holds that state already: nothing to do
        assert alloc.snapshot() is before and alloc.num_free_blocks == 4


@pytest.mark.parametrize(
    "flaw",
    [{"cancelled": (("z", ("x",)),)}, {"ended": (("z", "1"),)}],
    ids=["a cancelled life not an int", "an ended life not an int"],
)
def test_a_refused_sender_snapshot_changes_nothing(flaw: dict[str, object]) -> None:
    """restore used to set the lives and parked posts before checking the cancelled lives:
    a refused snapshot left the sender without its sources."""
    pair = Loopback(pool_blocks=8, block_size=4, hidden=2, default_allocate=8)
    pair.add("q", 6)
    before = pair.sender.snapshot()
    with pytest.raises(InvalidArgumentError, match="must be ints"):
        pair.sender.restore(before._replace(lives=(), **flaw))  # type: ignore[arg-type]
    assert pair.sender.snapshot() == before
    pair.run(50)  # the sender still holds q's source: the request lands whole
    result = pair.receiver.take("q")
    assert result.ok and result.output is not None
    assert result.output.equal(pair.sources["q"])
