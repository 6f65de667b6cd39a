"""What the receiver and the sender need of a transport: one interface per role.

Posts (receiver to sender) travel in order. Statuses (sender to receiver) may be
delayed, duplicated and reordered; they are never lost while the sender lives (a
lost status is a dead peer, which the transport reports as
:class:`~resumekit.protocol.messages.PeerLost`). The backends are in
:mod:`resumekit.transports`; the drivers check an end for these methods when they
are made, and use nothing else of it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from resumekit.allocator.buffers import EmbeddingTensors
    from resumekit.protocol.messages import (
        Cancelled,
        Landed,
        Post,
        RoundPost,
        SenderError,
        Status,
    )


class ReceiverTransport(Protocol):
    """The receiver's end."""

    def post_round(self, post: RoundPost) -> None:
        """Ask the sender to write one round."""

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        """Tell the sender this life of the request is gone; ``epoch``: the round in flight."""

    def poll_statuses(self) -> Sequence[Status]:
        """Statuses that arrived since the last poll; an empty tuple (no allocation) if none."""
        ...

    def check_request_id(self, rid: Hashable) -> None:
        """Raise :class:`~resumekit.errors.InvalidArgumentError` for an id this transport
        cannot carry (over torch.distributed, anything but an int64), before a block is
        taken for it."""


class SenderTransport(Protocol):
    """The sender's end."""

    def poll_posts(self) -> Sequence[Post]:
        """Posts and cancels that arrived since the last poll, in order."""
        ...

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        """Put ``data`` into the receiver's blocks named by ``post``; ``aux`` is the first
        block's aux row (``None``: zeros)."""

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        """Send a status to the receiver; call only once the round's writes are complete."""

    def check_request_id(self, rid: Hashable) -> None:
        """As :meth:`ReceiverTransport.check_request_id`."""
