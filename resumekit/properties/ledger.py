"""The explorer's ledger: what it saw posted, written, read and freed, per live allocation.

Kept apart from :mod:`~resumekit.properties.world` (which wires it to the real
objects) because it is the checker's memory: every exactly-once and integrity
verdict about a round is read from it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Final

from resumekit.allocator.block_allocator import Allocation
from resumekit.properties.invariants import (
    EXACTLY_ONCE,
    INTEGRITY,
    NO_WRITE_AFTER_FREE,
    InvariantViolation,
    allocation_freed_once,
    allocation_posted_once,
    cancelled_once,
    post_expects,
    require,
    round_consumed_once,
    round_landed_before_consumed,
    write_into_live_round,
)
from resumekit.protocol import messages as msg

#: A :class:`Ledger`'s dicts, in the order a :class:`WorldState` keeps them.
LEDGER_PARTS: Final = (
    "rounds",
    "consumed",
    "labels",
    "owner",
    "lives",
    "incarnations",
    "cancels",
)


class Ledger:
    """The explorer's checker: what it saw posted, written, read and freed, per live allocation.

    ``rounds`` maps a live generation to ``(label, epoch, posts, written, consumed)``;
    ``consumed`` maps a life's label to the last epoch consumed; ``owner`` maps a
    block to the live generation holding it (the allocator's claims, checked);
    ``lives`` maps an incarnation the receiver gave to the life's number for its id, and
    ``incarnations`` maps (id, life number) back to it (the stale-life faults name one);
    ``cancels`` maps an incarnation to the Cancels the receiver sent for it.
    """

    def __init__(self) -> None:
        self.rounds: dict[int, tuple[int, int, int, bool, bool]] = {}
        self.consumed: dict[int, int] = {}
        self.labels: dict[Hashable, int] = {}  # request id -> the label of its current life
        self.owner: dict[int, int] = {}
        self.lives: dict[int, int] = {}
        self.incarnations: dict[tuple[Hashable, int], int] = {}
        self.cancels: dict[int, int] = {}
        # Copy on write: the dicts of the state last taken or restored are shared with
        # it, and the first change after copies the one dict it changes.
        self._state: tuple[dict[Any, Any], ...] | None = None
        self._shared: set[str] = set()

    def _own(self, name: str) -> Any:
        """The dict ``name``, this ledger's own to change."""
        self._state = None
        part = getattr(self, name)
        if name in self._shared:
            self._shared.discard(name)
            part = part.copy()
            setattr(self, name, part)
        return part

    def snapshot(self) -> tuple[dict[Any, Any], ...]:
        """The dicts in :data:`LEDGER_PARTS` order; a state must never change them."""
        state = self._state
        if state is None:
            d = self.__dict__
            state = self._state = tuple([d[name] for name in LEDGER_PARTS])
            self._shared = set(LEDGER_PARTS)
        return state

    def restore(self, state: tuple[dict[Any, Any], ...]) -> None:
        if state is not self._state:
            self.__dict__.update(zip(LEDGER_PARTS, state, strict=True))
            self._state = state
            self._shared = set(LEDGER_PARTS)

    def set_label(self, rid: Hashable, label: int) -> None:
        """``rid``'s current life is ``label``."""
        self._own("labels")[rid] = label

    def born(self, rid: Hashable, life: int, incarnation: int) -> None:
        """The receiver gave ``rid``'s life number ``life`` this ``incarnation``."""
        self._own("lives")[incarnation] = life
        self._own("incarnations")[(rid, life)] = incarnation

    def cancelled(self, rid: Hashable, incarnation: int) -> None:
        """The receiver sent a Cancel for life ``incarnation`` of ``rid``, dead link or not."""
        times = self.cancels.get(incarnation, 0) + 1
        require(EXACTLY_ONCE, cancelled_once(rid, incarnation, times))
        self._own("cancels")[incarnation] = times

    def issued(self, allocation: Allocation) -> None:
        g = allocation.generation
        owner = self._own("owner")
        for b in allocation.blocks:
            if b in owner:
                raise InvariantViolation(
                    EXACTLY_ONCE,
                    f"block {b} handed to generation {g} while generation {owner[b]} holds it",
                )
            owner[b] = g

    def freeing(self, allocation: Allocation, live: bool) -> None:
        g = allocation.generation
        if not live or any(self.owner.get(b) != g for b in allocation.blocks):
            raise InvariantViolation(EXACTLY_ONCE, allocation_freed_once(g, False) or "")
        owner = self._own("owner")
        for b in allocation.blocks:
            del owner[b]
        if g in self.rounds:
            del self._own("rounds")[g]

    def posted(self, post: msg.RoundPost) -> None:
        allocation = post.allocation
        assert allocation is not None
        g = allocation.generation
        known = self.rounds.get(g)
        posts = 1 if known is None else known[2] + 1
        if posts > 1:
            raise InvariantViolation(EXACTLY_ONCE, allocation_posted_once(g, posts) or "")
        if post.blocks != allocation.blocks or post.capacity_tokens != allocation.capacity_tokens:
            raise InvariantViolation(
                INTEGRITY,
                f"round {post.epoch} of request {post.rid!r} names blocks {list(post.blocks)} "
                f"({post.capacity_tokens} tokens); its allocation holds {list(allocation.blocks)} "
                f"({allocation.capacity_tokens})",
            )
        require(INTEGRITY, post_expects(post))
        label = self.labels.get(post.rid, -1)
        self._own("rounds")[g] = (label, post.epoch, posts, False, False)

    def written(self, post: msg.RoundPost, live: bool) -> None:
        allocation = post.allocation
        assert allocation is not None
        g = allocation.generation
        if not live or any(self.owner.get(b) != g for b in allocation.blocks):
            raise InvariantViolation(
                NO_WRITE_AFTER_FREE, write_into_live_round(post.rid, post.epoch, g, False) or ""
            )
        label, epoch, posts, _, consumed = self.rounds.get(g, (-1, post.epoch, 0, False, False))
        self._own("rounds")[g] = (label, epoch, posts, True, consumed)

    def reading(self, allocation: Allocation, what: str) -> tuple[int, int]:
        """The (label, epoch) of the round in ``allocation``; it must have been written."""
        g = allocation.generation
        known = self.rounds.get(g)
        if known is None or not known[3]:
            epoch = -1 if known is None else known[1]
            raise InvariantViolation(
                INTEGRITY,
                (round_landed_before_consumed(allocation.owner, epoch, False) or "") + f" ({what})",
            )
        return known[0], known[1]

    def consume(self, allocation: Allocation) -> tuple[int, int]:
        label, epoch = self.reading(allocation, "read_into")
        g = allocation.generation
        known = self.rounds[g]
        last = self.consumed.get(label, -1)
        if known[4] or epoch <= last:
            raise InvariantViolation(EXACTLY_ONCE, round_consumed_once(label, epoch, True) or "")
        self._own("rounds")[g] = (*known[:4], True)
        self._own("consumed")[label] = epoch
        return label, epoch


__all__ = ["LEDGER_PARTS", "Ledger"]
