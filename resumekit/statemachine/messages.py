"""What crosses between the receiver (language side) and the sender (encode side).

Every message about a round carries the round's epoch: the receiver decides
"already handled?" by epoch alone, never by block indices or buffer contents.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resumekit.allocator.block_allocator import Allocation

NO_EPOCH = -1


@dataclass(frozen=True, slots=True)
class RoundPost:
    """Receiver to sender: write tokens ``[sent, sent + capacity)`` into these blocks.

    ``allocation`` travels only in-process, where the sender writes through it
    and the buffers refuse it once freed; across processes only the indices do.
    ``expect_tokens`` is what the round must carry when the receiver already
    knows (the total arrived with round 0), so a transport may prepare for it.
    """

    rid: Hashable
    epoch: int
    blocks: tuple[int, ...]
    capacity_tokens: int
    sent: int
    allocation: Allocation | None = None
    expect_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Receiver to sender: drop the request; ``epoch`` is the round in flight or ``NO_EPOCH``."""

    rid: Hashable
    epoch: int = NO_EPOCH


@dataclass(frozen=True, slots=True)
class Landed:
    """Sender to receiver: round ``epoch`` is fully written (``tokens`` of ``total``)."""

    rid: Hashable
    epoch: int
    tokens: int
    total: int
    final: bool


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Sender to receiver: round ``epoch`` will not be written (any more)."""

    rid: Hashable
    epoch: int


@dataclass(frozen=True, slots=True)
class SenderError:
    """Sender to receiver: the sender refused round ``epoch`` and dropped the request."""

    rid: Hashable
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class PeerLost:
    """The transport's verdict: the sender is gone and can write nothing more."""

    reason: str


Post = RoundPost | Cancel
Status = Landed | Cancelled | SenderError | PeerLost

__all__ = [
    "NO_EPOCH",
    "Cancel",
    "Cancelled",
    "Landed",
    "PeerLost",
    "Post",
    "RoundPost",
    "SenderError",
    "Status",
]
