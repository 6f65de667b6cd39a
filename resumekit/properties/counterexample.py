"""Counterexamples: the explorer's findings, replayed from the initial world to print.

A trace is the list of actions to the violation; :func:`replay` runs it again on fresh
objects and words each action (:mod:`~resumekit.properties.trace`). A replay that goes
elsewhere raises :class:`ReplayDiverged`, never a shorter trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resumekit.errors import ResumeKitError
from resumekit.properties.invariants import CRASH, LIVENESS, InvariantViolation
from resumekit.properties.model import Harness
from resumekit.properties.trace import action_text
from resumekit.properties.world import World


@dataclass
class Counterexample:
    invariant: str
    detail: str
    totals: tuple[int, ...]
    actions: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"violates {self.invariant}: {self.detail}",
            f"  requests' totals (tokens): {list(self.totals)}",
        ]
        lines += [f"  {i}. {a}" for i, a in enumerate(self.actions, 1)]
        return "\n".join(lines)


class ReplayDiverged(ResumeKitError, AssertionError):
    """A trace, replayed from its initial state, went elsewhere than where it was found:
    the code under check is not deterministic (a checker's own defect to fix)."""


def replay(
    harness: Harness,
    totals: tuple[int, ...],
    actions: list[tuple[Any, ...]],
    *,
    raises_at_end: bool = False,
    restoring: bool = False,
) -> list[str]:
    """The lines of a trace, replayed on fresh objects from the initial world.

    Only the last action may raise, and it must when ``raises_at_end`` (the violation
    was that action raising); anything else raises :class:`ReplayDiverged`, never a
    silently shorter trace. ``restoring`` puts each state, before its action, into
    fresh objects from their own snapshots, as the explorer does.
    """
    w = harness.initial_world(totals)
    lines = []
    for n, action in enumerate(actions, 1):
        try:
            lines.append(action_text(action, w))  # words the world it acts on: may diverge
        except Exception as error:
            raise ReplayDiverged(
                f"replaying action {n} of {len(actions)} ({action[0]}) found no world to "
                f"word it in: {type(error).__name__}: {error}"
            ) from error
        try:
            if restoring:  # copies: restore skips the snapshot it took last
                s = w.snapshot()
                w.restore(
                    s._replace(
                        receiver=type(s.receiver)(*s.receiver),
                        sender=type(s.sender)(*s.sender),
                        allocator=type(s.allocator)(*s.allocator),
                    )
                )
            harness.apply(w, action)
            harness.key(w.snapshot())  # as the explorer does after every action
        except Exception as error:
            if n == len(actions) and raises_at_end:
                return lines
            raise ReplayDiverged(
                f"replaying action {n} of {len(actions)} ({lines[-1]}) raised "
                f"{type(error).__name__}: {error}"
            ) from error
    if raises_at_end:
        raise ReplayDiverged(
            f"the last of {len(actions)} actions ({lines[-1] if lines else 'none'}) raised "
            "when explored, and not when replayed"
        )
    return lines


def violation(
    harness: Harness,
    totals: tuple[int, ...],
    actions: list[tuple[Any, ...]],
    error: BaseException,
) -> Counterexample:
    if isinstance(error, InvariantViolation):
        invariant, detail = error.invariant, error.detail
    else:
        invariant, detail = CRASH, f"{type(error).__name__}: {error}"
    return traced(harness, totals, actions, invariant, detail, raises_at_end=True)


def traced(
    harness: Harness,
    totals: tuple[int, ...],
    actions: list[tuple[Any, ...]],
    invariant: str,
    detail: str,
    *,
    raises_at_end: bool = False,
) -> Counterexample:
    """The finding ``invariant: detail`` with its trace replayed. A trace that goes elsewhere
    on fresh objects and not on objects put back from their own snapshots, as the explorer
    runs it, is that finding instead: restore does not give back what snapshot took (the
    shipped code's defect). One that diverges both ways came from states the explorer
    restored across branches: a restore left something of another branch behind (a
    field its snapshot names and it did not put back); its actions are listed as found."""
    try:
        lines = replay(harness, totals, actions, raises_at_end=raises_at_end)
    except ReplayDiverged:
        try:
            lines = replay(harness, totals, actions, raises_at_end=raises_at_end, restoring=True)
            why = "objects restored from their own snapshots do not act as the ones that took them"
        except ReplayDiverged as diverged:
            lines = [repr(action) for action in actions]
            why = (
                "the explorer's trace replays neither on fresh objects nor restoring each "
                f"state, so a restore kept something of another state ({diverged})"
            )
        invariant, detail = CRASH, f"{why}: {detail}"
    return Counterexample(invariant, detail, totals, lines)


def unrestorable(
    harness: Harness, totals: tuple[int, ...], path: list[tuple[Any, ...]], error: Exception
) -> Counterexample:
    detail = f"the state these actions leave cannot be restored: {type(error).__name__}: {error}"
    return traced(harness, totals, path, CRASH, detail)


def unjudgeable(
    harness: Harness, totals: tuple[int, ...], path: list[tuple[Any, ...]], error: Exception
) -> Counterexample:
    detail = (
        f"the state these actions leave cannot be judged (asking the objects what they hold "
        f"raised): {type(error).__name__}: {error}"
    )
    return traced(harness, totals, path, CRASH, detail)


def stuck(harness: Harness, totals: tuple[int, ...], path: list[tuple[Any, ...]]) -> Counterexample:
    """The liveness counterexample: the way into a state no terminal state is reachable from."""
    w = harness.initial_world(totals)
    try:
        for action in path:
            harness.apply(w, action)
        waiting = ", ".join(f"r{r}" for r in range(len(totals)) if not _terminal(w, r))
    except Exception:  # replayed without restores it goes elsewhere: traced says so
        waiting = "a request"
    detail = (
        f"from here no terminal state is reachable ({waiting or 'nothing'} "
        "never finishes, even if the pool's other user keeps the blocks it may)"
    )
    return traced(harness, totals, path, LIVENESS, detail)


def _terminal(w: World, r: int) -> bool:
    return w.added[r] and w.receiver.poll(r).terminal


__all__ = [
    "Counterexample",
    "ReplayDiverged",
    "replay",
    "stuck",
    "traced",
    "unjudgeable",
    "unrestorable",
    "violation",
]
