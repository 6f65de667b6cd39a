"""Reference strategies: the "already handled?" decisions of the designs resumekit replaced.

Each is a receiver that decides, in the one hook the shipped receiver leaves for it
(:meth:`~resumekit.protocol.receiver.ResumableReceiver._classify`), what a
KVPoll-only engine would: it sees a status with no epoch ("a round landed", and
whether it was the last), the posted blocks and the buffers. The checkers must
catch all three, and must not catch ``epoch`` (the shipped receiver itself).

- ``seed-index`` (the original design note): skip when the current allocation's
  block indices equal the last processed allocation's. A pool that hands the
  freed blocks straight back makes the next genuine round look handled: hang.
- ``no-dedup`` (the event-loop bug): handle every observation, so a repeated
  status re-runs read/free/alloc/resume on a round that has not landed.
- ``sent-tokens`` (the note's later fix): skip when the progress marker read
  from the buffer equals the last resume point; a reused or fresh block holds a
  stale marker, so a repeat looks like progress. Its sender stamps the marker
  (:func:`stamp_progress`, which the checkers' transports apply to every write).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple

from resumekit.allocator.buffers import AUX_TOTAL_TOKENS
from resumekit.errors import InvalidArgumentError
from resumekit.protocol.messages import Landed, RoundPost
from resumekit.protocol.receiver import RequestRecord, ResumableReceiver, TransferResult
from resumekit.protocol.rounds import Verdict

#: Where a sent-tokens design's sender writes its progress marker in a round's aux row.
AUX_PROGRESS: Final = 2


def stamp_progress(post: RoundPost, tokens: int, aux: Sequence[int] | None) -> tuple[int, ...]:
    """``aux`` with the progress marker (tokens sent through this round) at
    :data:`AUX_PROGRESS`: what a sender for the ``sent-tokens`` design writes."""
    row = [*(aux or ()), 0, 0, 0][: max(AUX_PROGRESS + 1, len(aux or ()))]
    row[AUX_PROGRESS] = post.sent + tokens
    return tuple(row)


class KVPollView(NamedTuple):
    """What a KVPoll-style engine sees when "a round landed" for a live request."""

    final: bool
    epoch: int  # the receiver's current round
    blocks: tuple[int, ...] | None  # the posted round's blocks; None when nothing is posted
    capacity: int  # the posted round's capacity in tokens (0 when nothing is posted)
    sent: int  # tokens consumed so far
    total: int | None  # known once round 0 arrives (read from its aux row)
    marker: int | None  # the progress marker in the buffer, for designs that read it


class KVPollReceiver(ResumableReceiver):
    """A receiver that decides rounds as a KVPoll-only design: :meth:`judge` sees a
    :class:`KVPollView`; ``memos`` is its memory per request life."""

    name: ClassVar[str]
    reads_buffers: ClassVar[bool] = False
    remembers_blocks: ClassVar[bool] = False  # its memo holds block indices

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memos: dict[tuple[Hashable, int], object] = {}

    def judge(self, view: KVPollView, memo: object) -> tuple[Verdict, int]:
        """The verdict and, for CURRENT, how many tokens the design believes arrived."""
        raise NotImplementedError

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        """The memo after a round in blocks ``consumed`` was consumed, ``sent`` tokens in all."""
        return None

    def _classify(self, req: RequestRecord, status: Landed) -> tuple[Verdict, Landed]:
        allocation = req.allocation
        total, marker = req.total, None
        if allocation is not None and (self.reads_buffers or total is None):
            aux = self.buffers.read_aux(allocation)
            marker = aux[AUX_PROGRESS] if self.reads_buffers else None
            if total is None:
                total = aux[AUX_TOTAL_TOKENS]  # KVPoll designs learn the total from round 0
        view = KVPollView(
            status.final,
            req.epoch,
            allocation.blocks if allocation is not None else None,
            allocation.capacity_tokens if allocation is not None else 0,
            req.sent,
            total,
            marker,
        )
        life = (req.rid, req.incarnation)
        memo = self.memos.get(life)
        verdict, tokens = self.judge(view, memo)
        if verdict is not Verdict.CURRENT:
            return verdict, status
        assert allocation is not None
        self.memos[life] = self.remember(memo, allocation.blocks, req.sent + tokens)
        landed = Landed(
            req.rid, req.epoch, tokens, total or 0, status.final, incarnation=req.incarnation
        )
        return verdict, landed

    def take(self, rid: Hashable) -> TransferResult:
        result = super().take(rid)
        self.memos = {k: v for k, v in self.memos.items() if k[0] != rid}
        return result


def _kvpoll_tokens(view: KVPollView) -> int:
    """What a KVPoll design assumes a round carried: all of it if final, else a full buffer."""
    if view.final and view.total is not None:
        return view.total - view.sent
    return view.capacity


class NoDedup(KVPollReceiver):
    name = "no-dedup"

    def judge(self, view: KVPollView, memo: object) -> tuple[Verdict, int]:
        if view.blocks is None:
            return Verdict.UNEXPECTED, 0
        return Verdict.CURRENT, _kvpoll_tokens(view)


class SeedIndex(KVPollReceiver):
    name = "seed-index"
    remembers_blocks = True

    def judge(self, view: KVPollView, memo: object) -> tuple[Verdict, int]:
        if view.blocks is None or view.blocks == memo:
            return Verdict.STALE, 0  # "same allocation: already processed, skip"
        return Verdict.CURRENT, _kvpoll_tokens(view)

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return consumed


class SentTokens(KVPollReceiver):
    name = "sent-tokens"
    reads_buffers = True

    def judge(self, view: KVPollView, memo: object) -> tuple[Verdict, int]:
        resume_point = memo if isinstance(memo, int) else 0
        if view.blocks is None or view.marker is None or view.marker == resume_point:
            return Verdict.STALE, 0  # "no progress since the last resume: already handled"
        if view.final and view.total is not None:
            return Verdict.CURRENT, view.total - view.sent
        return Verdict.CURRENT, view.marker - view.sent

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return sent


@dataclass(frozen=True)
class Strategy:
    """A design under check: its name and the receiver that decides as it does."""

    name: str
    receiver: type[ResumableReceiver]

    @property
    def remembers_blocks(self) -> bool:
        return bool(getattr(self.receiver, "remembers_blocks", False))


STRATEGIES: Final[dict[str, Strategy]] = {
    s.name: s
    for s in (
        Strategy("seed-index", SeedIndex),
        Strategy("no-dedup", NoDedup),
        Strategy("sent-tokens", SentTokens),
        Strategy("epoch", ResumableReceiver),
    )
}
BROKEN: Final = ("seed-index", "no-dedup", "sent-tokens")


def strategy(name: str) -> Strategy:
    """The named strategy."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}"
        ) from None


__all__ = [
    "AUX_PROGRESS",
    "BROKEN",
    "STRATEGIES",
    "KVPollReceiver",
    "KVPollView",
    "NoDedup",
    "SeedIndex",
    "SentTokens",
    "Strategy",
    "stamp_progress",
    "strategy",
]
