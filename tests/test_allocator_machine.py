"""The allocator state machine passes on resumekit's allocator and catches planted bugs."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from resumekit.allocator import Allocation, BlockAllocator, ReuseOrder
from resumekit.properties.allocator_machine import resumekit_allocator_machine


@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
@pytest.mark.parametrize(("num_blocks", "block_size"), [(8, 4), (3, 1), (16, 7)])
def test_allocator_machine_passes(reuse: ReuseOrder, num_blocks: int, block_size: int) -> None:
    machine = resumekit_allocator_machine(num_blocks, block_size, reuse)
    run_state_machine_as_test(machine)


# -- planted bugs: each must be caught -------------------------------------------


class AcceptsDoubleFree(BlockAllocator):
    """Skips the liveness check: a second free returns the blocks again (LMCache #5005)."""

    def free(self, allocation: Allocation) -> None:
        if allocation._pool_id == self._pool_id and not self.is_live(allocation):
            self._free.give(allocation.blocks)
            return
        super().free(allocation)


class FreeOwnerFreesOne(BlockAllocator):
    """An abort path that frees only the first allocation of an owner (sglang #17483)."""

    def free_owner(self, owner: Hashable) -> int:
        mine = self.outstanding_of(owner)
        if mine:
            self.free(mine[0])
        return len(mine)


class UpToOvershoots(BlockAllocator):
    """allocate_up_to that ignores min_tokens when the pool is tight."""

    def allocate_up_to(
        self, num_tokens: int, owner: Hashable, min_tokens: int = 1
    ) -> Allocation | None:
        return super().allocate_up_to(num_tokens, owner, 1)


class ReusesGenerations(BlockAllocator):
    """Restarts generations at zero when the pool drains: identity by generation breaks."""

    def free(self, allocation: Allocation) -> None:
        super().free(allocation)
        if not self._live:
            self._next_generation = 0


class ImpossibleIsNone(BlockAllocator):
    """Returns None for a request that can never fit, so callers retry forever (vllm #35541)."""

    def allocate(self, num_tokens: int, owner: Hashable) -> Allocation | None:
        if isinstance(num_tokens, int) and num_tokens > self.capacity_tokens:
            return None
        return super().allocate(num_tokens, owner)


class WrongReuseOrder(BlockAllocator):
    """Claims LIFO but hands out the lowest free block first."""

    def _issue(self, n: int, owner: Hashable) -> Allocation:
        free = sorted(self._free.snapshot())
        self._free._stack[:] = sorted(free, reverse=True)  # type: ignore[attr-defined]
        return super()._issue(n, owner)


@pytest.mark.parametrize(
    ("planted", "message"),
    [
        (AcceptsDoubleFree, "a second free was accepted"),
        (FreeOwnerFreesOne, "free_owner"),
        (UpToOvershoots, "allocate_up_to"),
        (ReusesGenerations, "generation"),
        (ImpossibleIsNone, "beyond the pool"),
        (WrongReuseOrder, "lifo reuse should hand out"),
    ],
)
def test_allocator_machine_catches_planted_bug(planted: type[BlockAllocator], message: str) -> None:
    machine = resumekit_allocator_machine(6, 2, "lifo", allocator_type=planted)
    assert message in failure_text(machine)


def failure_text(machine: type[RuleBasedStateMachine]) -> str:
    """The messages of every distinct failure Hypothesis reports for ``machine``."""
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=300,
                stateful_step_count=30,
                phases=[Phase.generate, Phase.shrink],  # no explain phase: it traces every line
            ),
        )
    except BaseExceptionGroup as group:
        return "\n".join(str(e) for e in group.exceptions)
    except Exception as error:
        return str(error)
    raise AssertionError(f"{machine.__name__} found no bug")
