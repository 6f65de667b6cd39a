"""The two orders a pool hands its free blocks back in: one slice per take or give."""

from __future__ import annotations

from typing import Final, Protocol


class LifoFreeList:
    """Stack of free blocks: the most recently freed come back first (maximal reuse).

    A freed allocation's blocks come back in the same order on the next take of
    the same size; a fresh pool hands out its highest-numbered blocks first.
    Neither take nor give reverses anything, which keeps both to one slice.
    """

    __slots__ = ("_stack",)

    def __init__(self, num_blocks: int) -> None:
        self._stack: list[int] = list(range(num_blocks))

    def take(self, n: int) -> tuple[int, ...]:
        stack = self._stack
        blocks = tuple(stack[-n:])
        del stack[-n:]
        return blocks

    def give(self, blocks: tuple[int, ...]) -> None:
        self._stack.extend(blocks)

    def snapshot(self) -> list[int]:
        """Free blocks, the next to be handed out last."""
        return self._stack[:]

    def restore(self, order: tuple[int, ...]) -> None:
        self._stack = list(order)


class FifoFreeList:
    """Queue of free blocks (SGLang's deque order): the longest-free come back first.

    A list with a moving head instead of a deque, so taking n blocks is one slice.
    """

    __slots__ = ("_head", "_queue")

    _COMPACT_AT: Final = 1024

    def __init__(self, num_blocks: int) -> None:
        self._queue: list[int] = list(range(num_blocks))
        self._head = 0

    def take(self, n: int) -> tuple[int, ...]:
        head = self._head
        blocks = tuple(self._queue[head : head + n])
        head += n
        if head >= self._COMPACT_AT and 2 * head >= len(self._queue):
            # Amortised O(1) per block: the slice moved is never longer than what
            # was taken since the last compaction.
            del self._queue[:head]
            head = 0
        self._head = head
        return blocks

    def give(self, blocks: tuple[int, ...]) -> None:
        self._queue.extend(blocks)

    def snapshot(self) -> list[int]:
        """Free blocks, the next to be handed out first."""
        return self._queue[self._head :]

    def restore(self, order: tuple[int, ...]) -> None:
        self._queue = list(order)
        self._head = 0


class FreeList(Protocol):
    def take(self, n: int) -> tuple[int, ...]: ...
    def give(self, blocks: tuple[int, ...]) -> None: ...
    def snapshot(self) -> list[int]: ...
    def restore(self, order: tuple[int, ...]) -> None: ...
