"""What crosses between the receiver (language side) and the sender (encode side).

Every message about a round carries the round's epoch and the request's
incarnation: the receiver decides "already handled?" by epoch alone, never by
block indices or buffer contents, and a message from an earlier life of a
request id (the id was taken or aborted and then added again) by incarnation.
The incarnation is keyword-only and required, so no message can omit it.

Constructing a message checks nothing: a message is what arrived, so the end
that receives it checks each one (:func:`malformed_status`,
:func:`malformed_post`; a malformed item fails at most its own request), and a
transport's sending calls (``post_round``, ``cancel``, ``report``) refuse a
malformed one with :class:`~resumekit.errors.InvalidArgumentError`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resumekit._check import as_int
from resumekit.errors import InvalidArgumentError

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
    incarnation: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Receiver to sender: drop the request; ``epoch`` is the round in flight or ``NO_EPOCH``."""

    rid: Hashable
    epoch: int = NO_EPOCH
    incarnation: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Landed:
    """Sender to receiver: round ``epoch`` is fully written (``tokens`` of ``total``)."""

    rid: Hashable
    epoch: int
    tokens: int
    total: int
    final: bool
    incarnation: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Sender to receiver: round ``epoch`` will not be written (any more)."""

    rid: Hashable
    epoch: int
    incarnation: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class SenderError:
    """Sender to receiver: the sender refused round ``epoch`` and dropped the request."""

    rid: Hashable
    epoch: int
    reason: str
    incarnation: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class PeerLost:
    """The transport's verdict: the sender is gone and can write nothing more."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerBack:
    """The transport reached a sender again (a restarted one) after :class:`PeerLost`.

    It holds none of the earlier rounds: those requests failed with the loss;
    requests added from now on are served again.
    """

    reason: str


Post = RoundPost | Cancel
Status = Landed | Cancelled | SenderError | PeerLost | PeerBack
ROUND_STATUSES = (Landed, Cancelled, SenderError)


def _round_fields(item: Any) -> str | None:
    """What is wrong with the fields every message about a round has, or ``None``."""
    try:
        hash(item.rid)
    except TypeError:
        return "its request id is not hashable"
    if type(item.epoch) is not int or type(item.incarnation) is not int:
        return "epoch and incarnation must be ints"
    return None


def malformed_status(status: object) -> str | None:
    """Why ``status`` is not a well-formed status, or ``None``: checked per item of a batch."""
    kind = type(status)
    if kind is PeerLost or kind is PeerBack:
        return None if type(status.reason) is str else "reason is not a str"  # type: ignore[attr-defined]
    if kind not in ROUND_STATUSES:
        return f"{kind.__name__} is not a status"
    problem = _round_fields(status)
    if problem is not None:
        return problem
    if kind is Landed:
        landed: Landed = status  # type: ignore[assignment]
        if type(landed.tokens) is not int or type(landed.total) is not int:
            return "tokens and total must be ints"
        if type(landed.final) is not bool:
            return "final must be a bool"
    elif kind is SenderError and type(status.reason) is not str:  # type: ignore[attr-defined]
        return "reason is not a str"
    return None


def malformed_post(post: object) -> str | None:
    """Why ``post`` is not a well-formed post or cancel, or ``None``."""
    kind = type(post)
    if kind is not RoundPost and kind is not Cancel:
        return f"{kind.__name__} is not a post"
    problem = _round_fields(post)
    if problem is not None:
        return problem
    if kind is RoundPost:
        r: RoundPost = post  # type: ignore[assignment]
        if type(r.sent) is not int or type(r.capacity_tokens) is not int:
            return "sent and capacity_tokens must be ints"
        if type(r.blocks) is not tuple or not all(type(b) is int for b in r.blocks):
            return "blocks must be a tuple of ints"
        if r.expect_tokens is not None and type(r.expect_tokens) is not int:
            return "expect_tokens must be an int or None"
    return None


def _require(
    message: object,
    name: str,
    kind: type | tuple[type, ...],
    malformed: Callable[[object], str | None],
) -> None:
    if not isinstance(message, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise InvalidArgumentError(
            f"{name} must be a {' or '.join(k.__name__ for k in kinds)}, "
            f"not {type(message).__name__}"
        )
    problem = malformed(message)
    if problem is not None:
        raise InvalidArgumentError(f"{name} is malformed: {problem}")


def require_post(post: object) -> RoundPost:
    """``post`` itself, once proven a well-formed :class:`RoundPost` (for sending calls)."""
    _require(post, "post", RoundPost, malformed_post)
    r: RoundPost = post  # type: ignore[assignment]
    # What a cancel refuses, a post refuses too: lives count from 1, rounds from 0.
    as_int(r.epoch, "post.epoch", minimum=0)
    as_int(r.incarnation, "post.incarnation", minimum=1)
    as_int(r.sent, "post.sent", minimum=0)
    return r


def require_cancel(rid: Hashable, epoch: int, incarnation: int) -> Cancel:
    """The :class:`Cancel` a ``cancel(rid, epoch, incarnation=...)`` call sends."""
    as_int(epoch, "epoch", minimum=NO_EPOCH)
    as_int(incarnation, "incarnation", minimum=1)
    cancel = Cancel(rid, epoch, incarnation=incarnation)
    _require(cancel, "rid", Cancel, malformed_post)
    return cancel


def require_status(status: object) -> Landed | Cancelled | SenderError:
    """``status`` itself, once proven a well-formed round status (for ``report``)."""
    _require(status, "status", ROUND_STATUSES, malformed_status)
    return status  # type: ignore[return-value]
