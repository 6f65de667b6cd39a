"""Round filters: the receiver's answer to "is this status the round I am waiting for?".

A filter is a pure decision over an :class:`Observation`, so the receiver and
the bounded explorer's model run the very same code. resumekit decides by
epoch (:class:`EpochFilter`); the property suite plugs in the designs this
project replaced (``resumekit.properties.strategies``) and shows it catches them.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple, Protocol


class Verdict(Enum):
    CURRENT = "current"  # the round in flight has landed: consume it
    STALE = "stale"  # a repeat or late duplicate: count it, change nothing
    UNEXPECTED = "unexpected"  # a round that was never posted: protocol error


class Observation(NamedTuple):
    """What a filter may look at when a landed status arrives for a live request.

    Filters that do not ``see_epoch`` get ``status_epoch`` and ``status_tokens``
    as ``None``: a KVPoll-style status says only "a round landed" (``final``
    says whether it was the last). ``marker`` is the progress marker read from
    the current allocation's buffer, only for filters that ``read_buffers``.
    """

    final: bool
    status_epoch: int | None
    status_tokens: int | None
    epoch: int  # the receiver's current round
    blocks: tuple[int, ...] | None  # the posted round's blocks; None when nothing is posted
    capacity: int  # the posted round's capacity in tokens (0 when nothing is posted)
    sent: int  # tokens consumed so far
    total: int | None  # known once round 0 arrives
    marker: int | None


class RoundFilter(Protocol):
    """Decides which landed statuses to consume; ``memo`` is its per-request memory."""

    name: str
    sees_epoch: bool
    reads_buffers: bool

    def judge(self, obs: Observation, memo: object) -> tuple[Verdict, int]:
        """The verdict and, for CURRENT, how many tokens the round carries."""
        ...

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        """The memo after a round in blocks ``consumed`` was consumed, ``sent`` tokens in all."""
        ...


class EpochFilter:
    """Current iff the status's epoch is the posted round's; older is stale, newer an error."""

    name = "epoch"
    sees_epoch = True
    reads_buffers = False

    def judge(self, obs: Observation, memo: object) -> tuple[Verdict, int]:
        epoch = obs.status_epoch
        assert epoch is not None and obs.status_tokens is not None
        if epoch < obs.epoch:
            return Verdict.STALE, 0
        if epoch == obs.epoch and obs.blocks is not None:
            return Verdict.CURRENT, obs.status_tokens
        return Verdict.UNEXPECTED, 0

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return None


__all__ = ["EpochFilter", "Observation", "RoundFilter", "Verdict"]
