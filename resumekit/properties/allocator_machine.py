"""The allocator contract as a Hypothesis state machine, runnable against any allocator.

A reference model tracks which blocks are free (and, for a declared reuse
order, in which order they come back) and which owner holds what; after every
step the allocator under test must agree with it. Point it at a third-party
allocator by writing an :class:`AllocatorAdapter` and calling
:func:`allocator_machine`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resumekit.allocator.block_allocator import Allocation, BlockAllocator, ReuseOrder
from resumekit.errors import (
    CapacityExceededError,
    DoubleFreeError,
    ForeignAllocationError,
    InvalidArgumentError,
)

H = TypeVar("H")

OWNERS: tuple[Hashable, ...] = ("r0", "r1", "r2", ("req", 3))


class Unsupported(Exception):
    """An adapter raises this for an operation its allocator does not have; the rule is skipped."""


class AllocatorAdapter(Generic[H]):
    """How the machine drives one allocator; subclass it for your own.

    Required: the ``num_blocks`` and ``block_size`` of the pool under test, and
    ``allocate``, ``free`` and ``blocks``. The ``*_error`` attributes name what
    each misuse must raise (``Exception`` accepts anything but silence).
    """

    num_blocks: int
    block_size: int
    #: Order the allocator promises to hand back freed blocks in; ``None`` checks no order.
    reuse: ReuseOrder | None = None
    invalid_error: type[BaseException] = Exception
    capacity_error: type[BaseException] = Exception
    double_free_error: type[BaseException] = Exception
    foreign_error: type[BaseException] = Exception

    def allocate(self, num_tokens: int, owner: Hashable) -> H | None:
        raise NotImplementedError

    def free(self, handle: H) -> None:
        raise NotImplementedError

    def blocks(self, handle: H) -> Sequence[int]:
        raise NotImplementedError

    def allocate_up_to(self, num_tokens: int, owner: Hashable, min_tokens: int) -> H | None:
        raise Unsupported

    def free_owner(self, owner: Hashable) -> int:
        raise Unsupported

    def num_free_blocks(self) -> int:
        raise Unsupported

    def generation(self, handle: H) -> int:
        """A number that must be unique and increasing across all allocations."""
        raise Unsupported

    def forge(self, handle: H) -> H:
        """A look-alike of a live handle (same blocks, same owner) that is not it."""
        raise Unsupported

    def foreign(self) -> H:
        """A live handle from a different allocator instance."""
        raise Unsupported

    def snapshot(self) -> object:
        """A value that changes whenever the allocator's state does."""
        raise Unsupported

    def check(self) -> None:
        """The allocator's own consistency check, if it has one."""

    def check_quiescent(self) -> None:
        """Raise if anything is outstanding."""


class ResumeKitAllocatorAdapter(AllocatorAdapter[Allocation]):
    """Adapter for :class:`resumekit.allocator.BlockAllocator` (or a subclass)."""

    invalid_error = InvalidArgumentError
    capacity_error = CapacityExceededError
    double_free_error = DoubleFreeError
    foreign_error = ForeignAllocationError

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.num_blocks = allocator.num_blocks
        self.block_size = allocator.block_size
        self.reuse = allocator.reuse
        self._other = type(allocator)(allocator.num_blocks, allocator.block_size)

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        return self.allocator.allocate(num_tokens, owner)

    def free(self, handle: Allocation) -> None:
        self.allocator.free(handle)

    def blocks(self, handle: Allocation) -> Sequence[int]:
        return handle.blocks

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int
    ) -> Allocation | None:
        return self.allocator.allocate_up_to(num_tokens, owner, min_tokens)

    def free_owner(self, owner: Hashable) -> int:
        return self.allocator.free_owner(owner)

    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def generation(self, handle: Allocation) -> int:
        return handle.generation

    def forge(self, handle: Allocation) -> Allocation:
        return Allocation(handle.blocks, handle.capacity_tokens, handle.owner, handle.generation)

    def foreign(self) -> Allocation:
        self._other.free_owner("foreign")
        handle = self._other.allocate(1, "foreign")
        assert handle is not None
        return handle

    def snapshot(self) -> object:
        a = self.allocator
        return (
            tuple(a._free.snapshot()),
            tuple(id(x) for x in a.outstanding()),
            a.next_generation,
        )

    def check(self) -> None:
        self.allocator.check_invariants()
        live = {id(x) for x in self.allocator.outstanding()}
        assert len(live) == len(self.allocator.outstanding())

    def check_quiescent(self) -> None:
        self.allocator.check_quiescent()


class _Model(Generic[H]):
    """What a correct allocator's state must be after the same calls."""

    def __init__(self, num_blocks: int, reuse: ReuseOrder | None) -> None:
        self.reuse = reuse
        # LIFO: top of the stack at the end. FIFO: head of the queue at the front.
        self.free: list[int] = list(range(num_blocks))
        self.live: list[tuple[H, Hashable, tuple[int, ...]]] = []
        self.freed: list[H] = []

    def predict(self, n: int) -> tuple[int, ...] | None:
        if self.reuse == "lifo":
            return tuple(self.free[-n:])
        if self.reuse == "fifo":
            return tuple(self.free[:n])
        return None

    def take(self, handle: H, owner: Hashable, blocks: tuple[int, ...]) -> None:
        expected = self.predict(len(blocks))
        assert expected is None or blocks == expected, (
            f"{self.reuse} reuse should hand out {list(expected)}, got {list(blocks)}"
        )
        free = set(self.free)
        assert len(set(blocks)) == len(blocks), f"duplicate blocks in one allocation {blocks}"
        for b in blocks:
            assert b in free, f"block {b} handed out while it belongs to a live allocation"
        self.free = [b for b in self.free if b not in set(blocks)]
        self.live.append((handle, owner, blocks))

    def release(self, index: int) -> None:
        handle, _, blocks = self.live.pop(index)
        self.free.extend(blocks)
        self.freed.append(handle)


class AllocatorMachineBase(RuleBasedStateMachine, Generic[H]):
    """Rules for the allocator contract; :func:`allocator_machine` binds an adapter factory."""

    make_adapter: ClassVar[Callable[[], AllocatorAdapter[Any]]]

    def __init__(self) -> None:
        super().__init__()
        self.adapter: AllocatorAdapter[H] = type(self).make_adapter()
        self.model: _Model[H] = _Model(self.adapter.num_blocks, self.adapter.reuse)
        self.generations: list[int] = []

    # -- helpers ---------------------------------------------------------------

    def _capacity(self) -> int:
        return self.adapter.num_blocks * self.adapter.block_size

    def _need(self, tokens: int) -> int:
        return -(-tokens // self.adapter.block_size)

    def _snapshot(self) -> object:
        try:
            return self.adapter.snapshot()
        except Unsupported:
            return None

    def _expect_rejected(
        self, error: type[BaseException], what: str, call: Callable[[], object]
    ) -> None:
        before = self._snapshot()
        try:
            call()
        except error:
            pass
        else:
            raise AssertionError(f"{what} was accepted; it must raise {error.__name__}")
        assert self._snapshot() == before, f"{what} was rejected but changed the allocator"

    def _accept(self, handle: H, owner: Hashable, n_blocks: int) -> None:
        blocks = tuple(self.adapter.blocks(handle))
        assert len(blocks) == n_blocks, f"expected {n_blocks} blocks, got {len(blocks)}"
        self.model.take(handle, owner, blocks)
        try:
            generation = self.adapter.generation(handle)
        except Unsupported:
            return
        assert not self.generations or generation > self.generations[-1], (
            f"generation {generation} is not above the previous {self.generations[-1]}"
        )
        self.generations.append(generation)

    # -- rules -----------------------------------------------------------------

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def allocate(self, data: st.DataObject, owner: Hashable) -> None:
        cap, bs = self._capacity(), self.adapter.block_size
        tokens = data.draw(
            st.one_of(st.integers(1, cap), st.integers(-2, 0), st.integers(cap + 1, cap + 2 * bs)),
            label="num_tokens",
        )
        if tokens <= 0:
            self._expect_rejected(
                self.adapter.invalid_error,
                f"allocate({tokens})",
                lambda: self.adapter.allocate(tokens, owner),
            )
            return
        need = self._need(tokens)
        if need > self.adapter.num_blocks:
            self._expect_rejected(
                self.adapter.capacity_error,
                f"allocate({tokens}) beyond the pool",
                lambda: self.adapter.allocate(tokens, owner),
            )
            return
        handle = self.adapter.allocate(tokens, owner)
        if need > len(self.model.free):
            assert handle is None, (
                f"allocate({tokens}) succeeded with only {len(self.model.free)} free blocks"
            )
            return
        assert handle is not None, (
            f"allocate({tokens}) returned None with {len(self.model.free)} free blocks"
        )
        self._accept(handle, owner, need)

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def allocate_up_to(self, data: st.DataObject, owner: Hashable) -> None:
        cap = self._capacity()
        tokens = data.draw(st.integers(1, 3 * cap), label="num_tokens")
        min_tokens = data.draw(st.integers(1, min(tokens, cap)), label="min_tokens")
        try:
            handle = self.adapter.allocate_up_to(tokens, owner, min_tokens)
        except Unsupported:
            return
        n = min(self._need(tokens), len(self.model.free))
        if n < self._need(min_tokens):
            assert handle is None, (
                f"allocate_up_to({tokens}, min_tokens={min_tokens}) succeeded with "
                f"{len(self.model.free)} free blocks"
            )
            return
        assert handle is not None, (
            f"allocate_up_to({tokens}, min_tokens={min_tokens}) returned None with "
            f"{len(self.model.free)} free blocks"
        )
        self._accept(handle, owner, n)

    @precondition(lambda self: bool(self.model.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.model.live) - 1), label="live index")
        self.adapter.free(self.model.live[index][0])
        self.model.release(index)

    @precondition(lambda self: bool(self.model.freed))
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.model.freed), label="freed handle")
        self._expect_rejected(
            self.adapter.double_free_error, "a second free", lambda: self.adapter.free(handle)
        )

    @rule()
    def foreign_free(self) -> None:
        try:
            handle = self.adapter.foreign()
        except Unsupported:
            return
        self._expect_rejected(
            self.adapter.foreign_error,
            "freeing another allocator's allocation",
            lambda: self.adapter.free(handle),
        )

    @precondition(lambda self: bool(self.model.live))
    @rule(data=st.data())
    def forged_free(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.model.live) - 1), label="live index")
        try:
            forged = self.adapter.forge(self.model.live[index][0])
        except Unsupported:
            return
        self._expect_rejected(
            self.adapter.foreign_error,
            "freeing a forged copy of a live allocation",
            lambda: self.adapter.free(forged),
        )

    @rule(owner=st.sampled_from(OWNERS))
    def free_owner(self, owner: Hashable) -> None:
        try:
            count = self.adapter.free_owner(owner)
        except Unsupported:
            return
        mine = [i for i, (_, o, _) in enumerate(self.model.live) if o == owner]
        assert count == len(mine), f"free_owner({owner!r}) freed {count}, expected {len(mine)}"
        again = self.adapter.free_owner(owner)
        assert again == 0, f"free_owner({owner!r}) left {again} allocation(s) behind"
        # Oldest generation first, as the allocator frees them.
        for offset, i in enumerate(mine):
            self.model.release(i - offset)

    @rule(bad=st.sampled_from([True, 1.5, "8", None]))
    def bad_num_tokens(self, bad: object) -> None:
        self._expect_rejected(
            self.adapter.invalid_error,
            f"allocate({bad!r})",
            lambda: self.adapter.allocate(bad, "r0"),  # type: ignore[arg-type]
        )

    # -- invariants ------------------------------------------------------------

    @invariant()
    def free_count_matches_model(self) -> None:
        try:
            free = self.adapter.num_free_blocks()
        except Unsupported:
            return
        assert free == len(self.model.free), (
            f"allocator reports {free} free blocks; {len(self.model.free)} are free"
        )

    @invariant()
    def allocator_consistent(self) -> None:
        self.adapter.check()

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None:
            return  # a step already failed: keep its report, not a consequence of it
        while self.model.live:
            self.adapter.free(self.model.live[-1][0])
            self.model.release(len(self.model.live) - 1)
        self.adapter.check_quiescent()


def allocator_machine(
    make_adapter: Callable[[], AllocatorAdapter[Any]], name: str = "AllocatorMachine"
) -> type[AllocatorMachineBase[Any]]:
    """A state machine class checking the allocators ``make_adapter`` builds."""
    if not callable(make_adapter):
        raise InvalidArgumentError(
            f"make_adapter must be a callable returning an AllocatorAdapter, "
            f"not {type(make_adapter).__name__}"
        )
    return type(name, (AllocatorMachineBase,), {"make_adapter": staticmethod(make_adapter)})


def resumekit_allocator_machine(
    num_blocks: int = 8,
    block_size: int = 4,
    reuse: ReuseOrder = "lifo",
    allocator_type: type[BlockAllocator] = BlockAllocator,
) -> type[AllocatorMachineBase[Any]]:
    """The machine for resumekit's own allocator (or a subclass, e.g. with a planted bug)."""
    if not (isinstance(allocator_type, type) and issubclass(allocator_type, BlockAllocator)):
        raise InvalidArgumentError(
            f"allocator_type must be BlockAllocator or a subclass, not {allocator_type!r}"
        )
    allocator_type(num_blocks, block_size, reuse=reuse)  # the arguments' own checks, now

    def make() -> AllocatorAdapter[Any]:
        return ResumeKitAllocatorAdapter(allocator_type(num_blocks, block_size, reuse=reuse))

    return allocator_machine(make, f"{allocator_type.__name__}Machine_{reuse}")


__all__ = [
    "AllocatorAdapter",
    "AllocatorMachineBase",
    "ResumeKitAllocatorAdapter",
    "Unsupported",
    "allocator_machine",
    "resumekit_allocator_machine",
]
