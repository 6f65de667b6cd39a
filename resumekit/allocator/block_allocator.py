"""Host-side block bookkeeping for landing buffers.

Nothing here touches torch, takes a lock or calls the GPU: ``allocate`` and
``free`` are list slices and dict updates. Identity of an allocation is its
``generation``, never its block indices, because a pool that reuses freed blocks
hands back the very same indices on the next round.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Final, Literal, NamedTuple, NoReturn

from resumekit._check import as_int, check_hashable
from resumekit.allocator.free_lists import FifoFreeList, FreeList, LifoFreeList
from resumekit.errors import (
    CapacityExceededError,
    DoubleFreeError,
    ForeignAllocationError,
    InvalidArgumentError,
    InvariantError,
    LeakError,
    UseAfterFreeError,
)

ReuseOrder = Literal["lifo", "fifo"]

_pool_ids: Final = itertools.count(1)

MAX_NUM_BLOCKS: Final = 1 << 24
"""The most blocks one pool may have: its free list costs ~36 bytes of host memory per block."""
MAX_BLOCK_SIZE: Final = (1 << 31) - 1
"""Token counts travel as int32 (the aux row, the wire), so a block holds fewer than 2**31."""
_HOST_BYTES_PER_BLOCK: Final = 36


class Allocation:
    """A set of blocks handed to one owner; immutable, identified by its generation.

    Two allocations are equal only when they are the same object: equal blocks
    never make two allocations the same (the reused-indices ABA problem).
    """

    __slots__ = ("_blocks", "_capacity_tokens", "_freed", "_generation", "_owner", "_pool_id")

    def __init__(
        self,
        blocks: tuple[int, ...],
        capacity_tokens: int,
        owner: Hashable,
        generation: int,
        pool_id: int = 0,
    ) -> None:
        self._blocks = blocks
        self._capacity_tokens = capacity_tokens
        self._owner = owner
        self._generation = generation
        self._pool_id = pool_id
        self._freed = False  # set by the allocator that frees it: a rebuilt copy is not

    @property
    def blocks(self) -> tuple[int, ...]:
        """Block indices in the order tokens fill them."""
        return self._blocks

    @property
    def capacity_tokens(self) -> int:
        """``len(blocks) * block_size``."""
        return self._capacity_tokens

    @property
    def owner(self) -> Hashable:
        return self._owner

    @property
    def generation(self) -> int:
        """Strictly increasing per allocator; never reused, even when the blocks are."""
        return self._generation

    def __repr__(self) -> str:
        return (
            f"Allocation(generation={self._generation}, owner={self._owner!r}, "
            f"blocks={list(self._blocks)}, capacity_tokens={self._capacity_tokens})"
        )


class AllocatorSnapshot(NamedTuple):
    """An allocator's whole state as a value: :meth:`BlockAllocator.snapshot`."""

    pool_id: int  # the allocator it was taken of
    free: tuple[int, ...]  # in the free list's order (lifo: the next out last; fifo: first)
    live: tuple[Allocation, ...]  # oldest generation first
    next_generation: int


class BlockAllocator:
    """A pool of ``num_blocks`` blocks of ``block_size`` tokens, with checked ownership.

    ``reuse="lifo"`` (default) hands the most recently freed blocks out first, in
    the order they were freed, so a freed round's blocks come straight back and
    index-reuse bugs show up; ``reuse="fifo"`` hands out the blocks free the
    longest, like SGLang's deque free list.
    """

    def __init__(self, num_blocks: int, block_size: int, *, reuse: ReuseOrder = "lifo") -> None:
        num_blocks = as_int(num_blocks, "num_blocks", minimum=1)
        if num_blocks > MAX_NUM_BLOCKS:
            raise CapacityExceededError(
                f"num_blocks={num_blocks:,} exceeds the {MAX_NUM_BLOCKS:,} a pool may have: its "
                f"free list alone would take {num_blocks * _HOST_BYTES_PER_BLOCK:,} bytes of "
                "host memory (use larger blocks)"
            )
        block_size = as_int(block_size, "block_size", minimum=1, maximum=MAX_BLOCK_SIZE)
        free_list: FreeList
        if reuse == "lifo":
            free_list = LifoFreeList(num_blocks)
        elif reuse == "fifo":
            free_list = FifoFreeList(num_blocks)
        else:
            raise InvalidArgumentError(f"reuse must be 'lifo' or 'fifo', got {reuse!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._reuse: ReuseOrder = reuse
        self._free = free_list
        self._take = free_list.take
        self._give = free_list.give
        self._num_free = num_blocks
        self._pool_id = next(_pool_ids)
        self._next_generation = 0
        self._live: dict[int, Allocation] = {}
        self._by_owner: dict[Hashable, dict[int, Allocation]] = {}
        self._snap: AllocatorSnapshot | None = None  # the last snapshot, while nothing changed

    # -- introspection -------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def reuse(self) -> ReuseOrder:
        return self._reuse

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self._num_blocks * self._block_size

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def next_generation(self) -> int:
        """The generation the next allocation will get."""
        return self._next_generation

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-as_int(num_tokens, "num_tokens", minimum=0) // self._block_size)

    def outstanding(self) -> tuple[Allocation, ...]:
        """Live allocations, oldest generation first."""
        return tuple(self._live.values())

    def outstanding_of(self, owner: Hashable) -> tuple[Allocation, ...]:
        """Live allocations of ``owner``, oldest generation first."""
        return tuple(self._by_owner.get(check_hashable(owner, "owner"), {}).values())

    def is_live(self, allocation: Allocation) -> bool:
        """Whether ``allocation`` was issued here and not yet freed."""
        if not isinstance(allocation, Allocation):
            raise InvalidArgumentError(
                f"allocation must be an Allocation, not {type(allocation).__name__}"
            )
        try:
            return self._live.get(allocation._generation) is allocation
        except TypeError:  # a forged, unhashable generation
            return False

    def check_live(self, allocation: object) -> Allocation:
        """``allocation`` if it is live here; raise the matching typed error otherwise."""
        try:
            if (
                isinstance(allocation, Allocation)
                and self._live.get(allocation._generation) is allocation
            ):
                return allocation
        except TypeError:
            pass
        self._raise_not_live(allocation, UseAfterFreeError)

    # -- allocate / free -----------------------------------------------------

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        """All of ``ceil(num_tokens / block_size)`` blocks, or ``None`` if not free now.

        Raises :class:`CapacityExceededError` when the pool could never hold
        ``num_tokens``, so a caller never retries an impossible request.
        """
        if type(num_tokens) is not int or num_tokens < 1:
            num_tokens = as_int(num_tokens, "num_tokens", minimum=1)
        n = -(-num_tokens // self._block_size)
        if n > self._num_free:
            if n > self._num_blocks:
                raise CapacityExceededError(
                    f"num_tokens={num_tokens} needs {n} blocks; the pool has {self._num_blocks}"
                )
            check_hashable(owner, "owner")
            return None
        return self._issue(n, owner)

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int = 1
    ) -> Allocation | None:
        """As many free blocks as ``num_tokens`` needs, but at least enough for ``min_tokens``.

        ``None`` when fewer than ``ceil(min_tokens / block_size)`` blocks are free
        now. ``num_tokens`` may exceed the pool (the rest comes in later rounds);
        ``min_tokens`` may not.
        """
        if type(num_tokens) is not int or num_tokens < 1:
            num_tokens = as_int(num_tokens, "num_tokens", minimum=1)
        if type(min_tokens) is not int or min_tokens < 1:
            min_tokens = as_int(min_tokens, "min_tokens", minimum=1)
        if min_tokens > num_tokens:
            raise InvalidArgumentError(
                f"min_tokens ({min_tokens}) must not exceed num_tokens ({num_tokens})"
            )
        bs = self._block_size
        at_least = -(-min_tokens // bs)
        if at_least > self._num_blocks:
            raise CapacityExceededError(
                f"min_tokens={min_tokens} needs {at_least} blocks; the pool has {self._num_blocks}"
            )
        n = min(-(-num_tokens // bs), self._num_free)
        if n < at_least:
            check_hashable(owner, "owner")
            return None
        return self._issue(n, owner)

    def _issue(self, n: int, owner: Hashable) -> Allocation:
        try:
            mine = self._by_owner.get(owner)  # first: an unhashable owner must change nothing
        except TypeError:
            raise InvalidArgumentError(
                f"owner must be hashable, not {type(owner).__name__}"
            ) from None
        self._snap = None
        generation = self._next_generation
        self._next_generation = generation + 1
        self._num_free -= n
        allocation = Allocation(
            self._take(n), n * self._block_size, owner, generation, self._pool_id
        )
        self._live[generation] = allocation
        if mine is None:
            self._by_owner[owner] = {generation: allocation}
        else:
            mine[generation] = allocation
        return allocation

    def free(self, allocation: Allocation) -> None:
        """Return the blocks of a live allocation to the pool.

        Raises :class:`DoubleFreeError` on a second free and
        :class:`ForeignAllocationError` for an allocation not issued here;
        either way nothing changes.
        """
        try:
            generation = allocation._generation
        except AttributeError:
            self._raise_not_live(allocation, DoubleFreeError)  # not an Allocation
        try:
            live = self._live.get(generation) is allocation
        except TypeError:  # a forged, unhashable generation
            live = False
        if not live:
            self._raise_not_live(allocation, DoubleFreeError)
        self._snap = None
        allocation._freed = True
        del self._live[generation]
        owner = allocation._owner
        mine = self._by_owner[owner]
        del mine[generation]
        if not mine:
            del self._by_owner[owner]
        blocks = allocation._blocks
        self._num_free += len(blocks)
        self._give(blocks)

    def free_owner(self, owner: Hashable) -> int:
        """Free every live allocation of ``owner`` (abort paths); idempotent.

        Returns how many allocations it freed.
        """
        mine = self._by_owner.get(check_hashable(owner, "owner"))
        if mine is None:
            return 0
        allocations = list(mine.values())
        for allocation in allocations:
            self.free(allocation)
        return len(allocations)

    def _raise_not_live(
        self, allocation: object, stale: type[DoubleFreeError] | type[UseAfterFreeError]
    ) -> NoReturn:
        if not isinstance(allocation, Allocation):
            raise InvalidArgumentError(
                f"allocation must be an Allocation, not {type(allocation).__name__}"
            )
        generation = allocation._generation
        if type(generation) is not int:
            raise ForeignAllocationError(
                f"allocation of owner {allocation.owner!r} has generation {generation!r}; "
                "this allocator issues int generations"
            )
        if allocation._pool_id != self._pool_id:
            raise ForeignAllocationError(
                f"allocation generation {generation} of owner {allocation.owner!r} "
                "was not issued by this allocator"
            )
        if (
            generation in self._live
            or not 0 <= generation < self._next_generation
            or not allocation._freed
        ):
            raise ForeignAllocationError(
                f"allocation generation {generation} of owner {allocation.owner!r} "
                "is a copy, not the allocation this allocator issued"
            )
        if stale is DoubleFreeError:
            raise DoubleFreeError(allocation)
        raise UseAfterFreeError(
            f"allocation generation {generation} of owner {allocation.owner!r} "
            f"(blocks {list(allocation.blocks)}) has been freed"
        )

    # -- checks --------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise :class:`InvariantError` unless each block is free or in one live allocation."""
        free = self._free.snapshot()
        seen: dict[int, str] = {}
        for block in free:
            if not 0 <= block < self._num_blocks:
                raise InvariantError(f"free list holds out-of-range block {block}")
            if block in seen:
                raise InvariantError(f"block {block} is in the free list twice")
            seen[block] = "free"
        by_owner_count = 0
        last_generation = -1
        for generation, allocation in self._live.items():
            if allocation._generation != generation or generation <= last_generation:
                raise InvariantError(f"live map out of order at generation {generation}")
            if generation >= self._next_generation:
                raise InvariantError(f"generation {generation} was never issued")
            last_generation = generation
            if self._by_owner.get(allocation._owner, {}).get(generation) is not allocation:
                raise InvariantError(f"generation {generation} missing from its owner's index")
            if allocation._capacity_tokens != len(allocation._blocks) * self._block_size:
                raise InvariantError(f"generation {generation} has a wrong capacity")
            for block in allocation._blocks:
                if not 0 <= block < self._num_blocks:
                    raise InvariantError(
                        f"generation {generation} holds out-of-range block {block}"
                    )
                if block in seen:
                    raise InvariantError(
                        f"block {block} is in generation {generation} and also {seen[block]}"
                    )
                seen[block] = f"generation {generation}"
        for mine in self._by_owner.values():
            if not mine:
                raise InvariantError("an owner with no allocations is still indexed")
            by_owner_count += len(mine)
        if by_owner_count != len(self._live):
            raise InvariantError("owner index and live map disagree")
        if len(free) != self._num_free:
            raise InvariantError(
                f"free count says {self._num_free}; the free list holds {len(free)}"
            )
        if len(seen) != self._num_blocks:
            missing = sorted(set(range(self._num_blocks)) - seen.keys())
            raise InvariantError(f"blocks neither free nor allocated: {missing[:16]}")

    def snapshot(self) -> AllocatorSnapshot:
        """The whole state as an immutable value (allocations are immutable: shared);
        the same object until the allocator changes. Raises :class:`InvariantError` when
        its own counts disagree, rather than take a state :meth:`restore` would repair."""
        snap = self._snap
        if snap is None:
            free = tuple(self._free.snapshot())
            if len(free) != self._num_free or sum(map(len, self._by_owner.values())) != len(
                self._live
            ):
                # A snapshot is exact or nothing: restoring would heal what a check must see.
                raise InvariantError(
                    f"the allocator's bookkeeping disagrees: {self._num_free} blocks counted "
                    f"free, {len(free)} in the free list; {len(self._live)} live allocations"
                )
            snap = self._snap = AllocatorSnapshot(
                self._pool_id, free, tuple(self._live.values()), self._next_generation
            )
        return snap

    def restore(self, snapshot: AllocatorSnapshot) -> None:
        """Put this allocator back into ``snapshot``, taken of it earlier.

        Generations rewind with it: an allocation issued after the snapshot is not
        this allocator's any more (freeing it raises). Raises
        :class:`InvalidArgumentError` and changes nothing for a snapshot of another
        pool or one that does not account for every block exactly once.
        """
        if snapshot is self._snap and snapshot is not None:
            return  # it holds that state already
        if not isinstance(snapshot, AllocatorSnapshot):
            raise InvalidArgumentError(
                f"snapshot must be an AllocatorSnapshot, not {type(snapshot).__name__}"
            )
        if snapshot.pool_id != self._pool_id:
            raise InvalidArgumentError("snapshot was taken of another allocator")
        live: dict[int, Allocation] = {}
        by_owner: dict[Hashable, dict[int, Allocation]] = {}
        held = len(snapshot.free)
        for a in snapshot.live:
            if not isinstance(a, Allocation) or a._pool_id != self._pool_id:
                raise InvalidArgumentError(f"snapshot holds {a!r}, not an allocation of this pool")
            if live and a._generation <= next(reversed(live)):
                raise InvalidArgumentError("snapshot's allocations are not in generation order")
            live[a._generation] = a
            by_owner.setdefault(a._owner, {})[a._generation] = a
            held += len(a._blocks)
        blocks = {*snapshot.free, *(b for a in snapshot.live for b in a._blocks)}
        if (
            held != self._num_blocks
            or len(blocks) != held
            or not blocks <= set(range(self._num_blocks))
            or (live and next(reversed(live)) >= snapshot.next_generation)
        ):
            raise InvalidArgumentError(
                "snapshot does not hold every block of the pool exactly once, in range"
            )
        self._free.restore(snapshot.free)
        self._num_free = len(snapshot.free)
        self._live, self._by_owner = live, by_owner
        self._next_generation = snapshot.next_generation
        self._snap = snapshot

    def check_quiescent(self) -> None:
        """Raise :class:`LeakError` naming every outstanding allocation, if any."""
        self.check_invariants()
        if self._live:
            raise LeakError(list(self._live.values()))

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self._num_blocks}, block_size={self._block_size}, "
            f"reuse={self._reuse!r}, free={self._num_free}, live={len(self._live)})"
        )
