"""What the bounded explorer enumerates, declared once: the faults, the bounds, the sets.

:data:`FAULTS` is the one list of fault kinds: the :class:`Bounds` field that
budgets each, the name ``resumekit check --faults`` takes, and the words
``verify`` prints. The bounds sets ``verify`` exhausts (:data:`STANDARD_BOUNDS`,
:data:`ADVERSARY_BOUNDS`, :data:`QUICK_BOUNDS`) are here too, and nowhere else.
A new fault kind is one :class:`Fault` row, a :class:`Bounds` field, and the
actions that spend it in :mod:`resumekit.properties.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Final

from resumekit.errors import ResumeKitError
from resumekit.protocol.policy import SchedulingPolicy


class InvalidBounds(ResumeKitError, ValueError):
    """Bounds that would explore nothing, or a pool that could never serve round 0."""


@dataclass(frozen=True)
class Fault:
    """One kind of fault: its ``check --faults`` name, its :class:`Bounds` field, its words."""

    name: str
    field: str
    words: str
    switch: bool = False  # a bool field (on or off), not a budget


#: Every fault kind, in the order budgets are kept and printed.
FAULTS: Final[tuple[Fault, ...]] = (
    Fault("duplicate", "duplicates", "duplicate"),
    Fault("abort", "aborts", "abort"),
    Fault("crash", "crashes", "crash"),
    Fault("grab", "pressure", "block grabbed after a free"),
    Fault("squeeze", "squeezes", "block squeezed"),
    Fault("forge", "forgeries", "forged status"),
    Fault("reuse", "reuses", "id reused"),
    Fault("restart", "restarts", "sender restart"),
    Fault("poison", "poisons", "malformed status or post, or a post skipping a round"),
    Fault("batch", "batches", "batches", switch=True),
    Fault("late", "late_sources", "late sources", switch=True),
)
BUDGETED: Final = tuple(f for f in FAULTS if not f.switch)
#: The actions liveness may count on: the engine's and the network's, never a fault.
FAIR: Final = frozenset({"add", "encode", "step", "deliver", "deliver-all", "event", "send"})
#: The statuses a forgery makes (for a round never posted, or of the id's earlier life).
FORGED: Final = ("landed", "cancelled", "error")
STALE: Final = "stale"  # a forged or poisoned status of the id's earlier life
OLD: Final = "old"  # a forged status of a round of this life already consumed
#: A forged Landed of a written round in flight, not the last, that says the request ends
#: with it (its tokens and the tokens before as the total).
TRUNCATED: Final = "truncated"
#: A forged Landed of a written round in flight, not the last, that says it is final.
PREMATURE: Final = "premature"
#: The field each poison garbles, and with what: a type no well-formed message has.
POISONED_STATUS: Final = ("rid", "epoch", "tokens", "final", "incarnation")
#: ``cancel``: a Cancel, not a round post, with an ill-typed incarnation.
POISONED_POST: Final = ("rid", "blocks", "sent", "incarnation", "cancel")
AHEAD: Final = "ahead"  # a well-typed post that skips a round: the sender must refuse it
#: A well-typed post of the round the sender owes, resuming past the tokens it sent.
ASKEW: Final = "askew"
#: A well-typed post of the round the sender owes, expecting a token more than it carries.
MISCOUNTED: Final = "miscounted"
POISON_VALUES: Final[dict[str, Any]] = {
    "rid": ["r"],  # unhashable: it names no request
    "epoch": None,
    "tokens": "1",
    "final": 1,
    "incarnation": None,
    "blocks": (None,),
    "sent": "0",
    STALE: None,  # the epoch, with the earlier life's incarnation
}

BUDGET_FIELDS: Final = tuple(f.field for f in BUDGETED)
#: Indices into :attr:`Bounds.budget` (and a world's remaining budget), by fault name.
BUDGET_INDEX: Final = {f.name: i for i, f in enumerate(BUDGETED)}
#: ``check --faults standard``: what the standard bounds allow.
STANDARD_FAULTS: Final = ("duplicate", "abort", "crash", "squeeze")

# Far past what an exhaustive search finishes (the state space grows exponentially in
# each), and small enough that nothing is built per unit of a bound before it starts.
MAX_BOUND: Final = {
    "blocks": 64,
    "requests": 16,
    "max_rounds": 64,
    "default_blocks": 64,
    "block_size": 64,
}
MAX_FAULTS: Final = 16
MAX_WINDOW: Final = 8  # rounds in flight of a policy the explorer runs


def policy_of(bounds: Bounds) -> SchedulingPolicy | None:
    """The receiver's policy under ``bounds``: small enough that every part of it acts."""
    if not bounds.policy:
        return None
    bs = bounds.block_size
    # Bulk above all but the largest total, so that smaller requests resume first-class;
    # a resume with more than a block left yields, so that with five rounds each kind acts.
    bulk = bs * max(1, bounds.max_rounds - 1)
    return SchedulingPolicy(bounds.policy, bulk, bs, max_passed_over=1, yield_tokens=bs)


@dataclass(frozen=True)
class Bounds:
    """What the explorer enumerates: pool, requests, totals and the fault budget.

    ``block_size`` tokens per block; totals range over ``1..max_rounds`` blocks'
    worth of tokens, so a request takes at most ``max_rounds`` rounds. Each
    fault may happen up to its budget, anywhere: ``duplicates`` (a status sent
    twice), ``aborts``, ``crashes`` (the sender dies, maybe right after a write),
    ``pressure`` (blocks another pool user takes right after a free, before the
    freer can allocate again), ``squeezes`` (blocks it takes from the free pool
    at any step; it may keep for good all but a default round's worth, and gives
    back the rest at some point), ``forgeries`` (a status for a round never posted),
    ``reuses`` (an id added again after its life was taken, old statuses still in
    flight), ``restarts`` (the sender dies and a fresh one takes over) and
    ``poisons`` (a malformed status or post). ``batches`` also delivers every
    status in flight in one batch; ``late_sources`` lets the encoder finish a
    request at any point instead of before the receiver starts it. ``policy`` (``n``
    >= 1) runs the receiver under :func:`policy_of`: a window of ``n`` rounds in
    flight, every request above ``max_rounds - 1`` blocks bulk (so smaller ones resume
    first-class), its resumes one block each, passed over by at most one admission.
    """

    blocks: int = 4
    requests: int = 2
    max_rounds: int = 4
    default_blocks: int = 1
    reuse: str = "lifo"
    block_size: int = 1
    duplicates: int = 1
    aborts: int = 1
    crashes: int = 1
    pressure: int = 1
    squeezes: int = 0
    forgeries: int = 0
    reuses: int = 0
    restarts: int = 0
    poisons: int = 0
    batches: bool = False
    late_sources: bool = False
    policy: int = 0

    def __post_init__(self) -> None:
        switches = {f.field for f in FAULTS if f.switch}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "reuse":
                if value not in ("lifo", "fifo"):
                    raise InvalidBounds(f"reuse must be lifo or fifo, not {value!r}")
            elif f.name in switches:
                if not isinstance(value, bool):
                    raise InvalidBounds(f"{f.name} must be a bool")
            elif type(value) is not int:
                raise InvalidBounds(f"{f.name} must be an int, not {type(value).__name__}")
        for name in MAX_BOUND:
            if not 1 <= getattr(self, name) <= MAX_BOUND[name]:
                raise InvalidBounds(
                    f"{name} must be in 1..{MAX_BOUND[name]}, got {getattr(self, name)}"
                )
        if not 0 <= self.policy <= MAX_WINDOW:
            raise InvalidBounds(f"policy must be in 0..{MAX_WINDOW}, got {self.policy}")
        for name in BUDGET_FIELDS:
            if not 0 <= getattr(self, name) <= MAX_FAULTS:
                raise InvalidBounds(f"{name} must be in 0..{MAX_FAULTS}, got {getattr(self, name)}")
        if self.default_blocks > self.blocks:
            raise InvalidBounds(
                f"default_blocks ({self.default_blocks}) must not exceed blocks ({self.blocks})"
            )
        if self.pressure + self.squeezes > self.blocks:
            raise InvalidBounds(
                f"pressure {self.pressure} and squeezes {self.squeezes} exceed the pool's "
                f"{self.blocks} blocks"
            )

    @property
    def budget(self) -> tuple[int, ...]:
        """What each budgeted fault may spend, in :data:`BUDGETED` order."""
        return tuple(getattr(self, name) for name in BUDGET_FIELDS)


def with_faults(bounds: Bounds, names: set[str]) -> Bounds:
    """``bounds`` allowing exactly the faults ``names`` (each once, or switched on)."""
    unknown = names - {f.name for f in FAULTS}
    if unknown:
        raise InvalidBounds(
            f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(f.name for f in FAULTS)}"
        )
    chosen: dict[str, Any] = {
        f.field: (f.name in names) if f.switch else int(f.name in names) for f in FAULTS
    }
    return replace(bounds, **chosen)


def describe(b: Bounds) -> str:
    """The bounds in words."""
    faults = [f"{getattr(b, f.field)} {f.words}" for f in BUDGETED if getattr(b, f.field)]
    extras = [f.words for f in FAULTS if f.switch and getattr(b, f.field)]
    if b.policy:
        bulk = max(1, b.max_rounds - 1)
        extras.append(
            f"policy: {b.policy} in flight, bulk above {bulk} block(s), "
            "a resume with more than 1 block left yields"
        )
    return (
        f"{b.blocks} blocks, {b.requests} request{'s' if b.requests > 1 else ''}, "
        f"up to {b.max_rounds} rounds each; "
        f"faults: {', '.join(faults) or 'none'}" + (f"; {', '.join(extras)}" if extras else "")
    )


#: What ``resumekit verify`` exhausts first: 5 blocks, 2 requests, up to 5 rounds each,
#: one duplicated status, one abort, one sender crash and one block squeezed out of the
#: pool at any step (the squeezed-pool set below adds blocks grabbed right after frees).
STANDARD_BOUNDS: Final = Bounds(blocks=5, requests=2, max_rounds=5, pressure=0, squeezes=1)

#: ``verify --quick`` (the mutation run's check): a smaller pool instead of the standard.
QUICK_BOUNDS: Final = Bounds(blocks=3, requests=2, max_rounds=2)

#: The base of the wider adversary's bounds: a small pool and no fault yet.
_SMALL: Final = Bounds(
    blocks=3, requests=2, max_rounds=2, duplicates=0, aborts=0, crashes=0, pressure=0
)

#: The wider adversary, each fault family on a pool small enough to exhaust quickly.
ADVERSARY_BOUNDS: Final[dict[str, Bounds]] = {
    # An id added again after take/abort while statuses of its earlier life are in flight.
    "id reuse": replace(_SMALL, duplicates=1, aborts=1, reuses=1),
    # The sender restarts with no records; ids are reused after it.
    "sender restart": replace(_SMALL, aborts=1, restarts=1, reuses=1),
    # Refusals and landings for rounds never posted, malformed statuses and posts, batches.
    "forged and poisoned": replace(_SMALL, max_rounds=3, forgeries=1, poisons=1, batches=True),
    # Another pool user takes blocks at any step and right after frees: resumes wait.
    "squeezed pool": replace(_SMALL, max_rounds=3, pressure=1, squeezes=2),
    # The encoder finishes after the receiver posted, or after the request was aborted
    # and its id reused (sources are bound to lives in the order they are added).
    "late sources": replace(_SMALL, aborts=1, reuses=1, late_sources=True),
    # Faults combined, each beside id reuse: forged, ill-typed and batched statuses of
    # the id's earlier life (one request, so the pool is its alone and rounds are many),
    # sources that come late (a post the sender refuses before its source came)...
    "reused, forged and poisoned": replace(
        _SMALL,
        requests=1,
        max_rounds=3,
        reuses=1,
        forgeries=1,
        poisons=1,
        batches=True,
        late_sources=True,
    ),
    # ... a sender that restarts while another pool user squeezes the pool...
    "restart and squeeze": replace(_SMALL, restarts=1, squeezes=1, reuses=1),
    # ... and a sender crash with a block grabbed right after a free.
    "crash and grab": replace(_SMALL, crashes=1, pressure=1, reuses=1),
    # A scheduling policy: bulk resumes yield to admissions, one round in flight, while
    # an abort and an id reuse change who waits...
    "policy": replace(_SMALL, max_rounds=3, aborts=1, reuses=1, squeezes=1, policy=1),
    # ... and two rounds in flight, where a yielding round must wait for an idle link,
    # with three requests of up to five rounds: first-class, large and bulk resumes all
    # act, and two large ones with different tokens left can wait at once.
    "policy, two in flight": replace(_SMALL, requests=3, max_rounds=5, policy=2),
}


def bounds_sets(quick: bool = False) -> list[tuple[str, Bounds]]:
    """Every (name, bounds) ``verify`` exhausts for ``epoch``, in order."""
    first = ("quick", QUICK_BOUNDS) if quick else ("standard", STANDARD_BOUNDS)
    return [first, *ADVERSARY_BOUNDS.items()]


__all__ = [
    "ADVERSARY_BOUNDS",
    "AHEAD",
    "ASKEW",
    "BUDGETED",
    "BUDGET_INDEX",
    "FAIR",
    "FAULTS",
    "FORGED",
    "MAX_BOUND",
    "MISCOUNTED",
    "OLD",
    "POISONED_POST",
    "POISONED_STATUS",
    "POISON_VALUES",
    "PREMATURE",
    "QUICK_BOUNDS",
    "STALE",
    "STANDARD_BOUNDS",
    "STANDARD_FAULTS",
    "TRUNCATED",
    "Bounds",
    "Fault",
    "InvalidBounds",
    "bounds_sets",
    "describe",
    "policy_of",
    "with_faults",
]
