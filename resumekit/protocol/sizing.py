"""Round 0's allocation learned online: ``default_allocate_tokens="auto"``.

The receiver cannot know an embedding's size before round 0 lands, but it can
learn the sizes it has seen, per size hint the engine passes to ``add`` (the
modality, say). :class:`AutoSizer` keeps a window of recent totals per hint and
picks the round-0 allocation that needs the fewest expected rounds while the
expected over-allocation stays within a bound: ``waste`` times the expected
size, or what the fixed default would over-allocate on the same sizes, whichever
is larger (so it never needs more rounds than the fixed default). It only
chooses a number of tokens: every protocol guarantee is the same as with a fixed
default (the property suite runs with it on).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Final, NamedTuple

from resumekit._check import as_int
from resumekit.errors import InvalidArgumentError

DEFAULT_WASTE: Final = 0.25
DEFAULT_WINDOW: Final = 256
MIN_SAMPLES: Final = 16  # below this many sizes for a hint, the fixed default is used
REFRESH: Final = 32  # the choice is recomputed every this many new sizes of a hint
MAX_HINTS: Final = 1024  # hints remembered at most (~1 KiB each); the stalest is forgotten


class SizerSnapshot(NamedTuple):
    """An :class:`AutoSizer`'s learned state as a value, per hint from the least recently
    observed."""

    sizes: tuple[tuple[Hashable, tuple[int, ...]], ...]
    fresh: tuple[tuple[Hashable, int], ...]
    choice: tuple[tuple[Hashable, int], ...]


def round0_cap(pool_tokens: int, block_size: int) -> int:
    """The ``max_tokens`` a receiver gives its :class:`AutoSizer`: a quarter of the pool,
    so one admission never takes it (a choice is that, rounded down to whole blocks)."""
    pool_tokens = as_int(pool_tokens, "pool_tokens", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1)
    return max(block_size, pool_tokens // 4)


def check_waste(waste: object, name: str = "waste") -> float:
    """``waste`` as a float, once proven a number in [0, 10]."""
    if isinstance(waste, bool) or not isinstance(waste, int | float) or not 0 <= waste <= 10:
        raise InvalidArgumentError(f"{name} must be a number in [0, 10], got {waste!r}")
    return float(waste)


class AutoSizer:
    """Per size hint: the recent totals, and round 0's allocation chosen from them.

    ``fallback`` is used for a hint with fewer than ``min_samples`` sizes;
    ``max_tokens`` caps a choice (the receiver passes a quarter of its pool, so
    one admission never takes the pool); ``resume_tokens`` is the receiver's cap
    on a resume (``None``: the whole rest in one resume). At most ``max_hints``
    hints are remembered: a new one makes it forget the least recently observed, whose
    requests fall back to ``fallback`` until it is learned again (memory stays bounded
    when an engine passes ever new hints, a request id, say).
    """

    def __init__(
        self,
        block_size: int,
        max_tokens: int,
        *,
        fallback: int,
        resume_tokens: int | None = None,
        waste: float = DEFAULT_WASTE,
        window: int = DEFAULT_WINDOW,
        min_samples: int = MIN_SAMPLES,
        refresh: int = REFRESH,
        max_hints: int = MAX_HINTS,
    ) -> None:
        self.block_size = as_int(block_size, "block_size", minimum=1)
        self.max_tokens = as_int(max_tokens, "max_tokens", minimum=1)
        self.fallback = as_int(fallback, "fallback", minimum=1)
        self.resume_tokens = (
            None if resume_tokens is None else as_int(resume_tokens, "resume_tokens", minimum=1)
        )
        self.waste = check_waste(waste)
        self.min_samples = as_int(min_samples, "min_samples", minimum=1)
        self.refresh = as_int(refresh, "refresh", minimum=1)
        self.window = as_int(window, "window", minimum=self.min_samples, maximum=1 << 16)
        self.max_hints = as_int(max_hints, "max_hints", minimum=1, maximum=1 << 20)
        self._sizes: dict[Hashable, deque[int]] = {}
        self._fresh: dict[Hashable, int] = {}  # sizes seen since the last choice
        self._choice: dict[Hashable, int] = {}

    def choose(self, hint: Hashable) -> int:
        """Round 0's allocation for a request with ``hint``: one dict lookup."""
        return self._choice.get(hint, self.fallback)

    def observe(self, hint: Hashable, total: int) -> None:
        """A request with ``hint`` turned out to be ``total`` tokens long."""
        sizes = self._sizes.pop(hint, None)  # re-inserted last: the dict is in recency order
        if sizes is None:
            sizes = deque(maxlen=self.window)
            if len(self._sizes) >= self.max_hints:
                stalest = next(iter(self._sizes))
                del self._sizes[stalest]
                self._fresh.pop(stalest, None)
                self._choice.pop(stalest, None)
        self._sizes[hint] = sizes
        sizes.append(total)
        fresh = self._fresh.get(hint, 0) + 1
        if len(sizes) >= self.min_samples and (fresh >= self.refresh or hint not in self._choice):
            self._choice[hint] = self.best(list(sizes))
            fresh = 0
        self._fresh[hint] = fresh

    def snapshot(self) -> SizerSnapshot:
        """What it has learned, as an immutable value."""
        return SizerSnapshot(
            tuple([(h, tuple(q)) for h, q in self._sizes.items()]),
            tuple(self._fresh.items()),
            tuple(self._choice.items()),
        )

    def restore(self, snapshot: SizerSnapshot) -> None:
        """Forget what it learned since ``snapshot``; the settings stay."""
        if not isinstance(snapshot, SizerSnapshot):
            raise InvalidArgumentError(
                f"snapshot must be a SizerSnapshot, not {type(snapshot).__name__}"
            )
        self._sizes = {h: deque(q, maxlen=self.window) for h, q in snapshot.sizes}
        self._fresh = dict(snapshot.fresh)
        self._choice = dict(snapshot.choice)

    def best(self, sizes: list[int]) -> int:
        """The allocation, in whole blocks, with the fewest expected rounds over ``sizes``
        (the smallest such) whose expected over-allocation is within the bound."""
        bs = self.block_size
        cap = max(bs, self.max_tokens // bs * bs)
        fixed = min(cap, self.fallback)
        n = len(sizes)
        bound = max(self.waste * sum(sizes) / n, sum(fixed - s for s in sizes if s < fixed) / n)
        candidates = sorted({min(cap, -(-s // bs) * bs) for s in sizes} | {fixed})
        best, best_rounds = fixed, float("inf")
        for d in candidates:
            waste = sum(d - s for s in sizes if s < d) / n
            if waste > bound + 1e-9:
                break  # waste only grows with d
            rounds = sum(self._rounds(s, d) for s in sizes) / len(sizes)
            if rounds < best_rounds - 1e-9:
                best, best_rounds = d, rounds
        return best

    def _rounds(self, size: int, first: int) -> int:
        if size <= first:
            return 1
        if self.resume_tokens is None:
            return 2
        return 1 + -(-(size - first) // self.resume_tokens)
