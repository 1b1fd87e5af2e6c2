"""The desktop state table and its compare-and-swap writes."""

from __future__ import annotations

import uuid

import pytest

from deskpool.domain.errors import InvalidTransition, LostRace
from deskpool.domain.states import TRANSITIONS, DesktopState, check_transition, transition

S = DesktopState


class RecordingWriter:
    """Stands in for the repository: a dict of states with the same CAS rule."""

    def __init__(self, states: dict[uuid.UUID, str]) -> None:
        self.states = states

    def compare_and_set_state(
        self, desktop_id: uuid.UUID, expected: str, new: str, *,
        task: str | None = None, last_error: str | None = None,
    ) -> bool:
        if self.states.get(desktop_id) != expected:
            return False
        self.states[desktop_id] = new
        return True


def test_every_state_has_a_row_and_targets_are_states() -> None:
    assert set(TRANSITIONS) == set(DesktopState)
    for targets in TRANSITIONS.values():
        assert targets <= set(DesktopState)


def test_factory_path_is_allowed() -> None:
    for old, new in [(S.PROVISIONING, S.CUSTOMIZING), (S.CUSTOMIZING, S.READY),
                     (S.READY, S.RESERVED), (S.RESERVED, S.IN_USE), (S.IN_USE, S.RECYCLING),
                     (S.RECYCLING, S.READY), (S.READY, S.RETIRING), (S.RETIRING, S.RETIRED)]:
        check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.PROVISIONING, S.READY),  # skipping customization would skip the identity check
    (S.RETIRED, S.READY),  # retired is final
    (S.READY, S.IN_USE),  # a user is always reserved first
    (S.DELETING, S.READY),
])
def test_illegal_transitions_are_refused(old: DesktopState, new: DesktopState) -> None:
    with pytest.raises(InvalidTransition, match=f"from {old.value} to {new.value}"):
        check_transition(old, new)


def test_any_live_state_can_fail_into_error() -> None:
    for state in DesktopState:
        if state not in (S.ERROR, S.RETIRED, S.CHECKED_OUT):
            check_transition(state, S.ERROR)


def test_a_checked_out_desktop_leaves_only_by_coming_back_ready() -> None:
    """The laptop holds the user's newest work: no failure, retirement or deletion path may
    take the desktop while it is out; check-in, rollback or a forced check-in end it."""
    check_transition(S.READY, S.CHECKED_OUT)
    check_transition(S.CHECKED_OUT, S.READY)
    for new in set(DesktopState) - {S.READY}:
        with pytest.raises(InvalidTransition):
            check_transition(S.CHECKED_OUT, new)
    for held in (S.RESERVED, S.IN_USE, S.IDLE):  # a user's live session is never cut for it
        with pytest.raises(InvalidTransition):
            check_transition(held, S.CHECKED_OUT)


def test_the_loser_of_a_race_raises_and_never_overwrites() -> None:
    desktop = uuid.uuid4()
    writer = RecordingWriter({desktop: "ready"})
    transition(writer, desktop, S.READY, S.RESERVED)
    with pytest.raises(LostRace, match="another actor changed it first"):
        transition(writer, desktop, S.READY, S.RETIRING)
    assert writer.states[desktop] == "reserved"


def test_forbidden_move_does_not_touch_the_store() -> None:
    desktop = uuid.uuid4()
    writer = RecordingWriter({desktop: "retired"})
    with pytest.raises(InvalidTransition):
        transition(writer, desktop, S.RETIRED, S.READY)
    assert writer.states[desktop] == "retired"


def test_the_database_index_of_held_desktops_names_exactly_the_held_states() -> None:
    import re

    from deskpool.domain.states import HELD_STATES
    from deskpool.store.models import HELD_SQL

    assert set(re.findall(r"'([a-z_]+)'", HELD_SQL)) == {s.value for s in HELD_STATES}
