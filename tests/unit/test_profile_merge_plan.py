"""The three-way merge of a second session's profile changes: every rule, and no file of
either session ever lost."""

from __future__ import annotations

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.profile_merge import (
    Entry,
    EntryKind,
    LayerMode,
    SecondSession,
    Write,
    plan_merge,
    refusal,
    session_mode,
)

D = Entry(EntryKind.DIR, 0o40755, 1000, 1000)


def f(content: str, mode: int = 0o100644) -> Entry:
    return Entry(EntryKind.FILE, mode, 1000, 1000, content)


BASE = {"Docs": D, "Docs/shared.txt": f("v0"), "Docs/mine.txt": f("m0"),
        "Docs/theirs.txt": f("t0"), "old.txt": f("o0")}


def test_changes_of_one_side_are_kept_and_overlaps_get_a_conflict_copy() -> None:
    ours = {**BASE, "Docs/shared.txt": f("ours"), "Docs/mine.txt": f("m1"), "a.txt": f("a")}
    theirs = {**BASE, "Docs/shared.txt": f("theirs"), "Docs/theirs.txt": f("t1"),
              "b.txt": f("b")}
    del theirs["old.txt"]
    plan = plan_merge(BASE, ours, theirs, desktop="desk-02")
    assert plan.result == {
        "Docs": D, "Docs/shared.txt": f("ours"), "Docs/shared.txt.conflict-desk-02": f("theirs"),
        "Docs/mine.txt": f("m1"), "Docs/theirs.txt": f("t1"), "a.txt": f("a"),
        "b.txt": f("b")}
    assert plan.deletes == ["old.txt"]
    assert len(plan.conflicts) == 1 and "Docs/shared.txt" in plan.conflicts[0]
    assert "desk-02" in plan.conflicts[0]


def test_the_same_change_on_both_sides_is_no_conflict() -> None:
    both = {**BASE, "Docs/shared.txt": f("same")}
    plan = plan_merge(BASE, both, both, desktop="d")
    assert plan.empty and not plan.conflicts and plan.result == both


def test_a_file_deleted_by_one_and_changed_by_the_other_survives() -> None:
    ours = {k: v for k, v in BASE.items() if k != "Docs/shared.txt"}
    theirs = {**BASE, "Docs/shared.txt": f("edited")}
    plan = plan_merge(BASE, ours, theirs, desktop="d2")
    assert plan.result["Docs/shared.txt.conflict-d2"] == f("edited")
    ours2 = {**BASE, "Docs/shared.txt": f("edited")}
    theirs2 = {k: v for k, v in BASE.items() if k != "Docs/shared.txt"}
    plan2 = plan_merge(BASE, ours2, theirs2, desktop="d2")
    assert plan2.result["Docs/shared.txt"] == f("edited") and not plan2.deletes
    assert "deleted on d2" in plan2.conflicts[0]


def test_a_directory_deleted_by_ours_comes_back_for_a_new_file_of_theirs() -> None:
    ours = {k: v for k, v in BASE.items() if not k.startswith("Docs")}
    theirs = {**BASE, "Docs/new.txt": f("n")}
    plan = plan_merge(BASE, ours, theirs, desktop="d")
    assert plan.writes[:2] == [Write("Docs", "Docs", D), Write("Docs/new.txt", "Docs/new.txt",
                                                                  f("n"))]
    assert set(plan.result) == {"old.txt", "Docs", "Docs/new.txt"}


def test_a_directory_deleted_by_theirs_stays_while_ours_added_to_it() -> None:
    ours = {**BASE, "Docs/added.txt": f("x")}
    theirs = {k: v for k, v in BASE.items() if not k.startswith("Docs")}
    plan = plan_merge(BASE, ours, theirs, desktop="d")
    assert "Docs" not in plan.deletes and "Docs/theirs.txt" in plan.deletes
    assert set(plan.result) == {"Docs", "Docs/added.txt", "old.txt"}


def test_a_subtree_of_theirs_under_a_name_ours_made_a_file_goes_beside_it() -> None:
    ours = {**{k: v for k, v in BASE.items() if not k.startswith("Docs")}, "Docs": f("file")}
    theirs = {**BASE, "Docs/new.txt": f("n")}
    plan = plan_merge(BASE, ours, theirs, desktop="d")
    assert plan.result["Docs"] == f("file")
    assert plan.result["Docs.conflict-d"] == D
    assert plan.result["Docs.conflict-d/new.txt"] == f("n")
    assert {"Docs/mine.txt", "Docs/theirs.txt", "Docs/shared.txt"}.isdisjoint(plan.result)


def test_conflict_copies_never_overwrite_a_file() -> None:
    ours = {**BASE, "old.txt": f("o1"), "old.txt.conflict-d": f("earlier")}
    theirs = {**BASE, "old.txt": f("o2")}
    plan = plan_merge(BASE, ours, theirs, desktop="d")
    assert plan.result["old.txt.conflict-d"] == f("earlier")
    assert plan.result["old.txt.conflict-d-2"] == f("o2")


def test_every_file_of_both_sessions_is_in_the_result() -> None:
    ours = {**BASE, "Docs/shared.txt": f("o"), "x": f("x")}
    theirs = {**BASE, "Docs/shared.txt": f("t"), "y": f("y"), "Docs/mine.txt": f("t")}
    plan = plan_merge(BASE, ours, theirs, desktop="d")
    contents = {e.content for e in plan.result.values() if e.kind is EntryKind.FILE}
    changed = {e.content for tree in (ours, theirs) for k, e in tree.items()
               if e.kind is EntryKind.FILE and BASE.get(k) != e}
    assert changed <= contents


def test_paths_outside_the_home_are_refused() -> None:
    with pytest.raises(InvalidInput, match="not a relative path"):
        plan_merge({}, {}, {"../etc/passwd": f("x")}, desktop="d")


def test_the_pool_policy_decides_the_second_session() -> None:
    assert refusal(SecondSession.REFUSE, ["desk-01"]) is not None
    assert "desk-01" in (refusal(SecondSession.REFUSE, ["desk-01"]) or "")
    assert refusal(SecondSession.REFUSE, []) is None
    assert refusal(SecondSession.MERGE, ["desk-01"]) is None
    assert session_mode(SecondSession.READ_ONLY, other_session_open=True) is LayerMode.READ_ONLY
    assert session_mode(SecondSession.READ_ONLY, other_session_open=False) is (
        LayerMode.EXCLUSIVE)
    assert session_mode(SecondSession.MERGE, other_session_open=False) is LayerMode.EXCLUSIVE
    assert session_mode(SecondSession.MERGE, other_session_open=True) is LayerMode.MERGE
