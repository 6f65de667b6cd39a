"""The transport interface, and an in-process transport that tests can play the adversary on.

Posts (receiver to sender) travel in order. Statuses (sender to receiver) may
be delayed, duplicated and reordered by the hooks of :class:`InProcessTransport`;
they are never lost while the sender lives (a lost status is a dead peer, which
the transport reports as :class:`PeerLost`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.statemachine.messages import (
    Cancel,
    Cancelled,
    Landed,
    PeerLost,
    Post,
    RoundPost,
    SenderError,
    Status,
)

if TYPE_CHECKING:
    from resumekit.allocator.buffers import BlockBuffers, EmbeddingTensors

_EMPTY: tuple[Status, ...] = ()


class ReceiverTransport(Protocol):
    """The receiver's end."""

    def post_round(self, post: RoundPost) -> None:
        """Ask the sender to write one round."""

    def cancel(self, rid: Hashable, epoch: int) -> None:
        """Tell the sender the request is gone; ``epoch`` is the round in flight, if any."""

    def poll_statuses(self) -> Sequence[Status]:
        """Statuses that arrived since the last poll; an empty tuple (no allocation) if none."""
        ...


class SenderTransport(Protocol):
    """The sender's end."""

    def poll_posts(self) -> Sequence[Post]:
        """Posts and cancels that arrived since the last poll, in order."""
        ...

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        """Put ``data`` into the receiver's blocks named by ``post``."""

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        """Send a status to the receiver; call only once the round's writes are complete."""


StatusFilter = Callable[[list[Status]], tuple[list[Status], list[Status]]]


class InProcessTransport:
    """Both ends in one process over shared :class:`BlockBuffers`, driven step by step.

    Adversary hooks act on the statuses in flight (``in_flight``): ``hold`` /
    ``release`` delay them, ``duplicate``, ``reorder`` and ``shuffle`` rearrange
    them, ``inject`` forges one, ``crash_sender`` kills the sender (optionally
    right after its next write, before it reports), and ``adversary`` may split
    every batch into what is delivered now and what stays in flight.
    """

    def __init__(self, buffers: BlockBuffers) -> None:
        self.buffers = buffers
        self.posts: deque[Post] = deque()
        self.in_flight: list[Status] = []
        self.held = False
        self.sender_alive = True
        self.crash_after_next_write = False
        self.adversary: StatusFilter | None = None
        self.on_write: Callable[[RoundPost, int], None] | None = None
        self.posted = 0
        self.delivered = 0

    # -- receiver end ----------------------------------------------------------

    def post_round(self, post: RoundPost) -> None:
        self.posted += 1
        self.posts.append(post)

    def cancel(self, rid: Hashable, epoch: int) -> None:
        self.posts.append(Cancel(rid, epoch))

    def poll_statuses(self) -> Sequence[Status]:
        if not self.in_flight or self.held:
            return _EMPTY
        batch = self.in_flight
        if self.adversary is None:
            self.in_flight = []
        else:
            batch, self.in_flight = self.adversary(batch)
        self.delivered += len(batch)
        return batch

    # -- sender end ------------------------------------------------------------

    def poll_posts(self) -> Sequence[Post]:
        if not self.posts or not self.sender_alive:
            return ()
        batch = list(self.posts)
        self.posts.clear()
        return batch

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        if not self.sender_alive:
            return
        if post.allocation is None:
            raise TransportError("an in-process round post must carry its allocation")
        self.buffers.write(post.allocation, data.embeddings, data.fill_ids, data.mrope, aux=aux)
        if self.on_write is not None:
            self.on_write(post, data.num_tokens)
        if self.crash_after_next_write:
            self.crash_sender("sender crashed after writing a round")

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        if self.sender_alive:
            self.in_flight.append(status)

    # -- adversary -------------------------------------------------------------

    def hold(self) -> None:
        """Deliver nothing until :meth:`release`."""
        self.held = True

    def release(self) -> None:
        self.held = False

    def duplicate(self, index: int = -1) -> None:
        """Send the status at ``index`` of ``in_flight`` twice."""
        self.in_flight.append(self._at(index))

    def reorder(self, order: Sequence[int]) -> None:
        """Rearrange ``in_flight`` to ``[in_flight[i] for i in order]`` (a permutation)."""
        if sorted(order) != list(range(len(self.in_flight))):
            raise InvalidArgumentError(
                f"order must be a permutation of range({len(self.in_flight)})"
            )
        self.in_flight = [self.in_flight[i] for i in order]

    def shuffle(self, rng: random.Random) -> None:
        rng.shuffle(self.in_flight)

    def inject(self, status: Status) -> None:
        """Deliver a status the sender never sent (to test the receiver's checks)."""
        self.in_flight.append(status)

    def crash_sender(self, reason: str = "sender crashed") -> None:
        """The sender dies: it processes nothing more; statuses already sent still arrive."""
        if not self.sender_alive:
            return
        self.sender_alive = False
        self.crash_after_next_write = False
        self.posts.clear()
        self.in_flight.append(PeerLost(reason))

    def _at(self, index: int) -> Status:
        try:
            return self.in_flight[index]
        except IndexError:
            raise InvalidArgumentError(
                f"no status at index {index}; {len(self.in_flight)} in flight"
            ) from None


__all__ = ["InProcessTransport", "ReceiverTransport", "SenderTransport", "StatusFilter"]
