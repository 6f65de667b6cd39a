"""The receiver's protocol, declared once as data.

``TRANSITIONS`` is the single source of truth. It is loaded into a
``transitions.Machine`` (the reference machine, also rendered by
:func:`diagram`) and compiled into ``TABLE``, the plain dict lookup the hot
path uses: a ``transitions`` trigger costs about 10 us, a lookup well under one.
A test proves both agree on every (state, event, guard outcome).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final

from transitions import Machine

from resumekit.errors import InvalidArgumentError


class TransferState(IntEnum):
    """A request's state on the receiver; values match SGLang's ``KVPoll``."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4

    @property
    def terminal(self) -> bool:
        return self is TransferState.Success or self is TransferState.Failed


class Event(StrEnum):
    """What happens to a request."""

    BOOTSTRAPPED = "bootstrapped"  # the peer is known
    ADMIT = "admit"  # try to allocate the default landing buffer and post round 0
    LANDED = "landed"  # the current round's status arrived and passed validation
    ALLOCATE = "allocate"  # try to allocate the next round's blocks and post the resume
    STALE = "stale"  # a status for an old epoch, or for a finished request
    FAIL = "fail"  # abort, peer lost, protocol error


class Guard(StrEnum):
    """The one condition an event may branch on."""

    ALLOCATED = "allocated"  # the allocator returned blocks
    FINAL = "final"  # the landed round completes the transfer
    IN_FLIGHT = "in_flight"  # a posted round has not landed yet


class Action(StrEnum):
    """What the receiver does on a transition."""

    QUEUE_ADMISSION = "queue_admission"
    POST_ROUND = "post_round"
    WAIT_FOR_BLOCKS = "wait_for_blocks"
    CONSUME = "consume"  # copy the round out, free its blocks, next epoch
    FINISH = "finish"  # copy the last round out, free its blocks
    IGNORE = "ignore"  # count it, change nothing
    QUARANTINE = "quarantine"  # keep the in-flight round's blocks until it can no longer be written
    RELEASE = "release"  # nothing in flight: free what the request holds now


@dataclass(frozen=True)
class Transition:
    """One row of the declaration: ``source --event [guard is when]--> dest / action``."""

    source: TransferState
    event: Event
    dest: TransferState
    action: Action
    guard: Guard | None = None
    when: bool = True


S = TransferState
_LIVE: Final = (S.Bootstrapping, S.WaitingForInput, S.Transferring)
_ANY: Final = tuple(S)

TRANSITIONS: Final[tuple[Transition, ...]] = (
    Transition(S.Bootstrapping, Event.BOOTSTRAPPED, S.WaitingForInput, Action.QUEUE_ADMISSION),
    Transition(
        S.WaitingForInput, Event.ADMIT, S.Transferring, Action.POST_ROUND, Guard.ALLOCATED, True
    ),
    Transition(
        S.WaitingForInput,
        Event.ADMIT,
        S.WaitingForInput,
        Action.WAIT_FOR_BLOCKS,
        Guard.ALLOCATED,
        False,
    ),
    Transition(S.Transferring, Event.LANDED, S.Success, Action.FINISH, Guard.FINAL, True),
    Transition(S.Transferring, Event.LANDED, S.Transferring, Action.CONSUME, Guard.FINAL, False),
    Transition(
        S.Transferring, Event.ALLOCATE, S.Transferring, Action.POST_ROUND, Guard.ALLOCATED, True
    ),
    Transition(
        S.Transferring,
        Event.ALLOCATE,
        S.Transferring,
        Action.WAIT_FOR_BLOCKS,
        Guard.ALLOCATED,
        False,
    ),
    *(Transition(s, Event.STALE, s, Action.IGNORE) for s in (S.Transferring, S.Success, S.Failed)),
    Transition(S.Bootstrapping, Event.FAIL, S.Failed, Action.RELEASE),
    Transition(S.WaitingForInput, Event.FAIL, S.Failed, Action.RELEASE),
    Transition(S.Transferring, Event.FAIL, S.Failed, Action.QUARANTINE, Guard.IN_FLIGHT, True),
    Transition(S.Transferring, Event.FAIL, S.Failed, Action.RELEASE, Guard.IN_FLIGHT, False),
)

Outcome = tuple[TransferState, Action]


@dataclass(frozen=True, slots=True)
class Row:
    """The compiled entry for one (state, event): its guard and both outcomes."""

    guard: Guard | None
    if_true: Outcome
    if_false: Outcome


def compile_table(
    transitions: tuple[Transition, ...] = TRANSITIONS,
) -> dict[TransferState, dict[Event, Row]]:
    """``table[state][event]`` for every declared pair; a missing pair is an illegal event."""
    grouped: dict[tuple[TransferState, Event], list[Transition]] = {}
    for t in transitions:
        grouped.setdefault((t.source, t.event), []).append(t)
    table: dict[TransferState, dict[Event, Row]] = {s: {} for s in TransferState}
    for (source, event), rows in grouped.items():
        guards = {t.guard for t in rows}
        if len(guards) != 1:
            raise ValueError(f"{source.name}/{event.value} mixes guards {guards}")
        guard = rows[0].guard
        if guard is None:
            if len(rows) != 1:
                raise ValueError(f"{source.name}/{event.value} is declared twice")
            outcome = (rows[0].dest, rows[0].action)
            table[source][event] = Row(None, outcome, outcome)
            continue
        by_when = {t.when: (t.dest, t.action) for t in rows}
        if len(rows) != 2 or set(by_when) != {True, False}:
            raise ValueError(f"{source.name}/{event.value} needs exactly one row per guard outcome")
        table[source][event] = Row(guard, by_when[True], by_when[False])
    return table


TABLE: Final = compile_table()


def next_state(state: TransferState, event: Event, guard: bool = True) -> Outcome | None:
    """(dest, action) for ``event`` in ``state`` with the guard's outcome; ``None`` if illegal."""
    if not isinstance(state, TransferState):
        raise InvalidArgumentError(f"state must be a TransferState, not {state!r}")
    if not isinstance(event, Event):
        raise InvalidArgumentError(f"event must be an Event, not {event!r}")
    row = TABLE[state].get(event)
    if row is None:
        return None
    return row.if_true if guard else row.if_false


class ReferenceModel:
    """A model for the reference machine: guards read ``guard_values``, actions are logged."""

    def __init__(self) -> None:
        self.guard_values: dict[Guard, bool] = {}
        self.actions: list[Action] = []
        self.state: str = S.Bootstrapping.name

    def __getattr__(self, name: str) -> Any:
        if name in _GUARDS:
            guard = _GUARDS[name]
            return lambda: self.guard_values[guard]
        if name in _ACTIONS:
            action = _ACTIONS[name]
            return lambda: self.actions.append(action)
        raise AttributeError(name)


_GUARDS: Final = {g.value: g for g in Guard}
_ACTIONS: Final = {a.value: a for a in Action}


def _machine_transitions(transitions: tuple[Transition, ...]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for t in transitions:
        spec: dict[str, Any] = {
            "trigger": t.event.value,
            "source": t.source.name,
            "dest": t.dest.name,
            "after": t.action.value,
        }
        if t.guard is not None:
            spec["conditions" if t.when else "unless"] = [t.guard.value]
        result.append(spec)
    return result


def reference_machine(
    model: object, initial: TransferState = S.Bootstrapping, *, graph: bool = False
) -> Machine:
    """The declaration loaded into a ``transitions.Machine`` driving ``model``."""
    cls: type[Machine] = Machine
    kwargs: dict[str, Any] = {}
    if graph:
        from transitions.extensions.diagrams import GraphMachine  # noqa: PLC0415

        cls = GraphMachine
        kwargs = {"graph_engine": "mermaid", "show_conditions": True}
    return cls(
        model=model,
        states=[s.name for s in TransferState],
        transitions=_machine_transitions(TRANSITIONS),
        initial=initial.name,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        **kwargs,
    )


def diagram() -> str:
    """The protocol as a Mermaid state diagram, drawn by ``transitions`` from the declaration."""
    model = ReferenceModel()
    reference_machine(model, graph=True)
    text: str = model.get_graph().draw(None)
    return text
