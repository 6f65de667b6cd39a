"""Who gets the pool and the link next when several rounds wait: :class:`SchedulingPolicy`.

Without a policy the receiver serves waiting resumes first, then admissions, each in
the order they began to wait, and posts a round whenever blocks are free. That
order never deadlocks, but a request larger than the pool then streams through it
round after round while every request behind it waits (head-of-line blocking),
and the link's queue fills with rounds posted long before a resume that is due.

A policy changes who goes first, and nothing of the protocol:

* **bulk requests yield.** A request whose announced total exceeds ``bulk_tokens``
  (default: the whole pool, the requests a size-first design would refuse) is bulk:
  each of its resumes takes at most ``bulk_round_tokens``, and while it waits,
  admissions and the resumes of other requests go first. Each admission that passes
  a waiting bulk resume counts; after ``max_passed_over`` of them, that resume is
  served like any other (nothing passes it), so no request is passed over more
  than ``max_passed_over`` times in a row.
* **large resumes yield.** A waiting resume with more than ``yield_tokens`` left
  (default: half the pool) yields like a bulk one, counting the admissions that pass
  it. Of the waiting resumes that yield, the one with the fewest tokens left goes
  first (the oldest of equals), bulk ones last, in queue order. A burst of arrivals
  then queues behind no large round: the largest request takes the wait (what a
  size-first design's first fit does by accident when a large request finds no
  contiguous room), not everyone behind it.
* **yielding rounds use an idle link.** A yielding resume is posted only when no
  other round is in flight, so a request that arrives meanwhile queues behind at
  most one yielding round.
* **a window.** At most ``max_rounds_in_flight`` rounds are posted and not yet
  landed; the others wait in the receiver, in the order above, instead of in the
  link's queue, so a resume that is due is not queued behind rounds posted later.
  The window never blocks when no round is in flight, so it cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from resumekit._check import as_int
from resumekit.errors import InvalidArgumentError

DEFAULT_MAX_PASSED_OVER = 32


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    """How a :class:`~resumekit.protocol.receiver.ResumableReceiver` orders waiting rounds.

    Args:
        max_rounds_in_flight: rounds posted and not yet landed at most (``None``: no
            window). Size it to what keeps the link busy: about its bandwidth times
            a round trip, in rounds.
        bulk_tokens: a request whose total exceeds this is bulk (``None``: the pool's
            capacity, resolved by the receiver).
        bulk_round_tokens: what one resume of a bulk request allocates at most
            (``None``: an eighth of the pool).
        max_passed_over: admissions a waiting yielding resume (bulk, or large) lets
            pass before it is served ahead of them.
        yield_tokens: a waiting resume with more than this left yields (``None``: half
            the pool's capacity, resolved by the receiver).
    """

    max_rounds_in_flight: int | None = None
    bulk_tokens: int | None = None
    bulk_round_tokens: int | None = None
    max_passed_over: int = DEFAULT_MAX_PASSED_OVER
    yield_tokens: int | None = None

    def __post_init__(self) -> None:
        """Refuse a number no receiver can serve by, naming the field."""
        for name in ("max_rounds_in_flight", "bulk_tokens", "bulk_round_tokens", "yield_tokens"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_int(value, name, minimum=1))
        object.__setattr__(
            self, "max_passed_over", as_int(self.max_passed_over, "max_passed_over", minimum=0)
        )

    def resolved(self, pool_tokens: int, block_size: int) -> SchedulingPolicy:
        """This policy with its defaults filled in for a pool of ``pool_tokens``."""
        bulk = self.bulk_tokens if self.bulk_tokens is not None else pool_tokens
        chunk = self.bulk_round_tokens
        if chunk is None:
            chunk = max(block_size, pool_tokens // 8 // block_size * block_size)
        big = self.yield_tokens if self.yield_tokens is not None else max(1, pool_tokens // 2)
        return SchedulingPolicy(self.max_rounds_in_flight, bulk, chunk, self.max_passed_over, big)


def check_policy(policy: object) -> SchedulingPolicy | None:
    """``policy`` itself, after proving it is a :class:`SchedulingPolicy` or ``None``."""
    if policy is not None and not isinstance(policy, SchedulingPolicy):
        raise InvalidArgumentError(
            f"policy must be a SchedulingPolicy or None, not {type(policy).__name__}"
        )
    return policy


__all__ = ["DEFAULT_MAX_PASSED_OVER", "SchedulingPolicy", "check_policy"]
