"""Reference strategies: the "already handled?" decisions of the designs resumekit replaced.

Each is a :class:`~resumekit.statemachine.RoundFilter` that sees only what its
design saw: a KVPoll-style status with no epoch ("a round landed", and whether
it was the last). The property suite must catch all three, and must not catch
``epoch``.

- ``seed-index`` (the original design note): skip when the current allocation's
  block indices equal the last processed allocation's. A pool that hands the
  freed blocks straight back makes the next genuine round look handled: hang.
- ``no-dedup`` (the event-loop bug): handle every observation, so a repeated
  status re-runs read/free/alloc/resume on a round that has not landed.
- ``sent-tokens`` (the note's later fix): skip when the progress marker read
  from the buffer equals the last resume point; a reused or fresh block holds a
  stale marker, so a repeat looks like progress.
"""

from __future__ import annotations

from resumekit.errors import InvalidArgumentError
from resumekit.statemachine.dedup import EpochFilter, Observation, RoundFilter, Verdict


def _kvpoll_tokens(obs: Observation) -> int:
    """What a KVPoll design assumes a round carried: all of it if final, else a full buffer."""
    if obs.final and obs.total is not None:
        return obs.total - obs.sent
    return obs.capacity


class NoDedup:
    name = "no-dedup"
    sees_epoch = False
    reads_buffers = False

    def judge(self, obs: Observation, memo: object) -> tuple[Verdict, int]:
        if obs.blocks is None:
            return Verdict.UNEXPECTED, 0
        return Verdict.CURRENT, _kvpoll_tokens(obs)

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return None


class SeedIndex:
    name = "seed-index"
    sees_epoch = False
    reads_buffers = False
    remembers_blocks = True  # its memo holds block indices: no block symmetry for it

    def judge(self, obs: Observation, memo: object) -> tuple[Verdict, int]:
        if obs.blocks is None or obs.blocks == memo:
            return Verdict.STALE, 0  # "same allocation: already processed, skip"
        return Verdict.CURRENT, _kvpoll_tokens(obs)

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return consumed


class SentTokens:
    name = "sent-tokens"
    sees_epoch = False
    reads_buffers = True

    def judge(self, obs: Observation, memo: object) -> tuple[Verdict, int]:
        resume_point = memo if isinstance(memo, int) else 0
        if obs.blocks is None or obs.marker is None or obs.marker == resume_point:
            return Verdict.STALE, 0  # "no progress since the last resume: already handled"
        if obs.final and obs.total is not None:
            return Verdict.CURRENT, obs.total - obs.sent
        return Verdict.CURRENT, obs.marker - obs.sent

    def remember(self, memo: object, consumed: tuple[int, ...], sent: int) -> object:
        return sent


STRATEGIES: dict[str, type[RoundFilter]] = {
    "seed-index": SeedIndex,
    "no-dedup": NoDedup,
    "sent-tokens": SentTokens,
    "epoch": EpochFilter,
}
BROKEN = ("seed-index", "no-dedup", "sent-tokens")


def strategy(name: str) -> RoundFilter:
    """A fresh instance of the named strategy."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise InvalidArgumentError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}"
        ) from None


__all__ = ["BROKEN", "STRATEGIES", "NoDedup", "SeedIndex", "SentTokens", "strategy"]
