"""Round filters: the receiver's answer to "is this status the round I am waiting for?".

resumekit decides by epoch (:class:`EpochFilter`). The filter is pluggable so
that the property suite can run the designs this project replaced, and show
that it catches them.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from resumekit.statemachine.messages import Landed
    from resumekit.statemachine.receiver import RequestRecord


class Verdict(Enum):
    CURRENT = "current"  # the round in flight has landed: consume it
    STALE = "stale"  # a repeat or late duplicate: count it, change nothing
    UNEXPECTED = "unexpected"  # a round that was never posted: protocol error


class RoundFilter(Protocol):
    """Classifies a landed status for a live request."""

    name: str

    def classify(self, request: RequestRecord, status: Landed) -> Verdict: ...


class EpochFilter:
    """Current iff the status's epoch is the posted round's; older is stale, newer an error."""

    name = "epoch"

    def classify(self, request: RequestRecord, status: Landed) -> Verdict:
        if status.epoch < request.epoch:
            return Verdict.STALE
        if status.epoch == request.epoch and request.allocation is not None:
            return Verdict.CURRENT
        return Verdict.UNEXPECTED


__all__ = ["EpochFilter", "RoundFilter", "Verdict"]
