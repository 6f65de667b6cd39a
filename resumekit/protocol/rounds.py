"""The round filter: the receiver's answer to "is this status the round I am waiting for?".

resumekit decides by epoch alone, never by block indices or buffer contents: a
pool hands the same blocks back, and a buffer holds stale bytes. The decision is
a pure function, so every checker judges the code the receiver runs.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    CURRENT = "current"  # the round in flight has landed: consume it
    STALE = "stale"  # a repeat or late duplicate: count it, change nothing
    UNEXPECTED = "unexpected"  # a round that was never posted: protocol error


def by_epoch(round_epoch: int, status_epoch: int, in_flight: bool) -> Verdict:
    """The verdict on a landed status for ``status_epoch`` while the request is at
    ``round_epoch`` (its round in flight when ``in_flight``): an older epoch is a
    repeat, the current one is the round, a newer one was never posted."""
    if status_epoch < round_epoch:
        return Verdict.STALE
    if status_epoch == round_epoch and in_flight:
        return Verdict.CURRENT
    return Verdict.UNEXPECTED
