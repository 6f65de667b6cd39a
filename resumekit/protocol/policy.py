"""Who gets the pool and the link next when several rounds wait: :class:`SchedulingPolicy`.

Without a policy the receiver serves waiting resumes first, then admissions, each in
the order they began to wait, and posts a round whenever blocks are free. That
order never deadlocks, but a request larger than the pool then streams through it
round after round while every request behind it waits (head-of-line blocking),
and the link's queue fills with rounds posted long before a resume that is due.

A policy changes two things, and nothing of the protocol:

* **bulk requests yield.** A request whose announced total exceeds ``bulk_tokens``
  (default: the whole pool, the requests a size-first design would refuse) is bulk:
  each of its resumes takes at most ``bulk_round_tokens``, and while it waits,
  admissions and the resumes of other requests go first. Each admission that passes
  a waiting bulk resume counts; after ``max_passed_over`` of them, that resume is
  served like any other (nothing passes it), so no request is passed over more
  than ``max_passed_over`` times in a row.
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
        max_passed_over: admissions a waiting bulk resume lets pass before it is
            served ahead of them.
    """

    max_rounds_in_flight: int | None = None
    bulk_tokens: int | None = None
    bulk_round_tokens: int | None = None
    max_passed_over: int = DEFAULT_MAX_PASSED_OVER

    def __post_init__(self) -> None:
        """Refuse a number no receiver can serve by, naming the field."""
        for name in ("max_rounds_in_flight", "bulk_tokens", "bulk_round_tokens"):
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
        return SchedulingPolicy(self.max_rounds_in_flight, bulk, chunk, self.max_passed_over)


def check_policy(policy: object) -> SchedulingPolicy | None:
    """``policy`` itself, after proving it is a :class:`SchedulingPolicy` or ``None``."""
    if policy is not None and not isinstance(policy, SchedulingPolicy):
        raise InvalidArgumentError(
            f"policy must be a SchedulingPolicy or None, not {type(policy).__name__}"
        )
    return policy


__all__ = ["DEFAULT_MAX_PASSED_OVER", "SchedulingPolicy", "check_policy"]
