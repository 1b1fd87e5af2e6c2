"""Pool planning (pure): sizing by min/spare/max, rollout with canaries, maximum age."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.pools import OnLogout, PoolKind, PoolSpec
from deskpool.domain.states import DesktopState
from deskpool.reconciler.planning import DesktopFacts, plan_pool

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
V1, V2 = uuid.uuid4(), uuid.uuid4()


def desk(state: str = "ready", version: uuid.UUID = V1, assigned: bool = False,
         age_s: int = 60) -> DesktopFacts:
    return DesktopFacts(uuid.uuid4(), DesktopState(state), version, assigned,
                        NOW - timedelta(seconds=age_s))


def spec(**kw: object) -> PoolSpec:
    fields: dict[str, object] = {"name": "p", "template": "t", "min_size": 0, "max_size": 10,
                                 "spare": 2}
    fields.update(kw)
    return PoolSpec(**fields).validate()  # type: ignore[arg-type]


def test_empty_pool_gets_min_or_spare() -> None:
    assert plan_pool(spec(spare=2), V1, [], NOW).create == 2
    assert plan_pool(spec(min_size=5, spare=2), V1, [], NOW).create == 5


def test_spare_counts_desktops_on_their_way() -> None:
    desktops = [desk("provisioning"), desk("customizing")]
    assert plan_pool(spec(spare=2), V1, desktops, NOW).create == 0


def test_held_desktops_do_not_count_as_spare() -> None:
    desktops = [desk("in_use", assigned=True), desk("reserved", assigned=True), desk()]
    plan = plan_pool(spec(spare=2), V1, desktops, NOW)
    assert plan.create == 1  # 2 held + 2 spare = 4 wanted, 3 there


def test_never_above_max() -> None:
    desktops = [desk("in_use", assigned=True) for _ in range(4)]
    assert plan_pool(spec(max_size=5, spare=3), V1, desktops, NOW).create == 1


def test_scale_down_retires_only_free_ready_desktops() -> None:
    held = [desk("in_use", assigned=True) for _ in range(2)]
    free = [desk() for _ in range(4)]
    plan = plan_pool(spec(spare=1), V1, held + free, NOW)
    assert len(plan.retire) == 3 and set(plan.retire) <= {d.id for d in free}
    assert plan.create == 0


def test_rollout_retires_free_old_desktops_and_replaces_them() -> None:
    old_free = [desk(), desk()]
    old_held = desk("in_use", assigned=True)
    plan = plan_pool(spec(spare=2), V2, [*old_free, old_held], NOW)
    assert set(plan.retire) == {d.id for d in old_free}
    assert old_held.id not in plan.retire  # held ones go as their users leave
    assert plan.create == 2


def test_rollout_waits_for_canaries() -> None:
    old = [desk(), desk()]
    plan = plan_pool(spec(spare=2, canary=1), V2, old, NOW)
    assert plan.retire == [] and plan.create == 1  # one canary first
    canary_ready = desk(version=V2)
    plan = plan_pool(spec(spare=2, canary=1), V2, [*old, canary_ready], NOW)
    assert set(plan.retire) == {d.id for d in old}


def test_max_age_retires_old_free_desktops() -> None:
    young, old = desk(age_s=10), desk(age_s=7200)
    plan = plan_pool(spec(spare=2, max_age_s=3600), V1, [young, old], NOW)
    assert plan.retire == [old.id] and plan.create == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_size": 5, "max_size": 3}, r"max \(3\) is below min \(5\)"),
    ({"spare": 11}, r"spare \(11\) is above max \(10\)"),
    ({"kind": PoolKind.STATEFUL, "on_logout": OnLogout.RECYCLE_REVERT}, "stateful"),
    ({"naming_pattern": "nope"}, "naming pattern"),
    ({"clone_mode": "teleport"}, "clone mode"),
    ({"max_age_s": 0}, r"max_age_s \(0\) must be whole seconds"),
])
def test_bad_pool_specs_are_refused_naming_the_field(fields: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        spec(**fields)


def test_dedicated_desktops_waiting_for_their_users_are_not_spare() -> None:
    waiting = [desk(assigned=True) for _ in range(3)]
    plan = plan_pool(spec(spare=1), V1, waiting, NOW)
    assert plan.create == 1 and plan.retire == []


def test_a_stateful_desktop_awaiting_repair_keeps_its_seat() -> None:
    """Its user's failed desktop in a stateful pool is repaired, not replaced: no second
    desktop is made for the seat, and none above the maximum. A stateless one's seat is
    free again (it is replaced)."""
    failed = [desk("error", assigned=True)]
    stateful = spec(kind=PoolKind.STATEFUL, on_logout=OnLogout.RECYCLE_AS_IS, spare=1,
                    max_size=1)
    assert plan_pool(stateful, V1, failed, NOW).create == 0
    assert plan_pool(spec(spare=1, max_size=1), V1, failed, NOW).create == 1
    # An unassigned failed one holds no one's state: it is replaced in either kind.
    assert plan_pool(stateful, V1, [desk("error")], NOW).create == 1


def test_a_checked_out_desktop_keeps_its_seat_and_is_never_retired() -> None:
    """Offline on a laptop: it counts as its user's (no second desktop beside it), and no
    rollout, maximum age or scale-down takes it, old version and old age included."""
    out = desk("checked_out", version=V1, assigned=True, age_s=10 * 86400)
    plan = plan_pool(spec(spare=0, max_size=1, max_age_s=60), V2, [out], NOW)
    assert plan.retire == [] and plan.create == 0
    plan = plan_pool(spec(spare=0, min_size=0, max_size=0), V1, [out], NOW)
    assert plan.retire == []
