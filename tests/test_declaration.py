from __future__ import annotations

import pytest
from transitions import MachineError

from resumekit.protocol.declaration import (
    TABLE,
    TRANSITIONS,
    Action,
    Event,
    Guard,
    ReferenceModel,
    TransferState,
    Transition,
    compile_table,
    diagram,
    next_state,
    reference_machine,
)

S = TransferState


def test_states_match_sglang_kvpoll() -> None:
    assert {s.name: int(s) for s in TransferState} == {
        "Failed": 0,
        "Bootstrapping": 1,
        "WaitingForInput": 2,
        "Transferring": 3,
        "Success": 4,
    }


@pytest.mark.parametrize("state", list(TransferState))
@pytest.mark.parametrize("event", list(Event))
@pytest.mark.parametrize("guard", [True, False])
def test_table_agrees_with_the_transitions_machine(
    state: TransferState, event: Event, guard: bool
) -> None:
    model = ReferenceModel()
    model.guard_values = dict.fromkeys(Guard, guard)
    reference_machine(model, initial=state)
    try:
        model.trigger(event.value)  # type: ignore[attr-defined]
    except MachineError:
        reference = None
    else:
        assert len(model.actions) == 1
        reference = (S[model.state], model.actions[0])
    assert next_state(state, event, guard) == reference


def test_every_live_state_can_fail_and_terminal_states_cannot() -> None:
    for state in TransferState:
        legal = next_state(state, Event.FAIL) is not None
        assert legal != state.terminal
        if legal:
            assert next_state(state, Event.FAIL, False) == (S.Failed, Action.RELEASE)


def test_terminal_states_only_ignore() -> None:
    for state in (S.Success, S.Failed):
        assert set(TABLE[state]) == {Event.STALE}
        assert next_state(state, Event.STALE) == (state, Action.IGNORE)


def test_only_a_final_landing_reaches_success() -> None:
    into_success = [t for t in TRANSITIONS if t.dest is S.Success and t.source is not S.Success]
    assert into_success == [
        Transition(S.Transferring, Event.LANDED, S.Success, Action.FINISH, Guard.FINAL, True)
    ]


def test_diagram_shows_every_transition() -> None:
    text = diagram()
    assert text.lstrip().startswith("---") and "stateDiagram-v2" in text
    for t in TRANSITIONS:
        label = t.event.value
        if t.guard is not None:
            label += f" [{'' if t.when else '!'}{t.guard.value}]"
        assert label in text, label
    assert "Transferring --> Success: landed [final]" in text


def test_compile_rejects_malformed_declarations() -> None:
    row = Transition(S.Transferring, Event.LANDED, S.Success, Action.FINISH, Guard.FINAL, True)
    with pytest.raises(ValueError, match="exactly one row per guard outcome"):
        compile_table((row,))
    other_guard = Transition(
        S.Transferring, Event.LANDED, S.Transferring, Action.CONSUME, Guard.ALLOCATED, False
    )
    with pytest.raises(ValueError, match="mixes guards"):
        compile_table((row, other_guard))
    plain = Transition(S.Bootstrapping, Event.FAIL, S.Failed, Action.RELEASE)
    with pytest.raises(ValueError, match="declared twice"):
        compile_table((plain, plain))


def test_compiled_table_has_every_declared_transition_and_no_other() -> None:
    declared = {(t.source, t.event) for t in TRANSITIONS}
    compiled = {(s, e) for s, events in TABLE.items() for e in events}
    assert declared == compiled
