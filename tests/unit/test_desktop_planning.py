"""One desktop's next step (pure): which step each state, power policy and backoff asks for."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from deskpool.domain.models import PowerState
from deskpool.domain.pools import PowerPolicy
from deskpool.domain.states import DesktopState, DesktopTask
from deskpool.reconciler.planning import Step, StepKind, plan_desktop
from deskpool.reconciler.steps import RUNNERS
from deskpool.store.desktops import DesktopSummary

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
POOL, HOST = uuid.uuid4(), uuid.uuid4()
S = DesktopState


def summary(state: DesktopState, *, pool: uuid.UUID | None = POOL,
            power: PowerState = PowerState.RUNNING, task: DesktopTask | None = None,
            user: str | None = None, next_attempt_at: datetime | None = None) -> DesktopSummary:
    return DesktopSummary(
        id=uuid.uuid4(), host_id=HOST, pool_id=pool, template_version_id=uuid.uuid4(),
        state=state, power_state=power, task=task, assigned_user=user,
        created_at=NOW - timedelta(hours=1), next_attempt_at=next_attempt_at)


# What a free pool desktop in each state needs when its pool keeps desktops running and it
# runs: every state has an answer here, so a new state cannot be added without one.
EXPECTED: dict[DesktopState, StepKind | None] = {
    S.PROVISIONING: StepKind.PROVISION,
    S.CUSTOMIZING: StepKind.MAKE_READY,
    S.READY: None,  # running as its policy wants
    S.RESERVED: None,  # a user's: the broker's, not the reconciler's
    S.IN_USE: None,
    S.IDLE: None,
    S.RECYCLING: StepKind.RECYCLE,
    S.RETIRING: StepKind.REMOVE,
    S.RETIRED: StepKind.REMOVE,
    S.DELETING: StepKind.REMOVE,
    S.ERROR: StepKind.RETIRE_FAILED,  # a pool desktop: replaced, not repaired
    S.CHECKED_OUT: None,  # offline on a laptop: left alone (see below)
}


def test_every_state_has_a_decision() -> None:
    assert set(EXPECTED) == set(DesktopState)


@pytest.mark.parametrize("state", list(DesktopState))
def test_each_state_gets_its_step(state: DesktopState) -> None:
    desktop = summary(state, task=DesktopTask.REVERT)
    step = plan_desktop(desktop, PowerPolicy.RUNNING, NOW)
    kind = EXPECTED[state]
    if kind is None:
        assert step is None
    else:
        # The step carries what it needs: whose it is, where, the state it starts from
        # (checked again when it runs) and the task in flight.
        assert step == Step(kind, desktop.id, HOST, state, DesktopTask.REVERT)


def test_a_checked_out_desktop_gets_no_step_whatever_its_power_or_policy() -> None:
    """Its VM is off on purpose (frozen for the laptop): no policy powers it on or away."""
    for policy in PowerPolicy:
        for power in PowerState:
            for user in (None, "alice"):
                out = summary(S.CHECKED_OUT, power=power, user=user)
                for stateful in (False, True):
                    assert plan_desktop(out, policy, NOW, stateful=stateful) is None


def test_recycling_carries_its_task() -> None:
    for task in (DesktopTask.REVERT, DesktopTask.KEEP):
        step = plan_desktop(summary(S.RECYCLING, task=task), None, NOW)
        assert step is not None and step.task is task


def test_a_failed_desktop_holding_its_users_state_is_repaired_never_replaced() -> None:
    alices = summary(S.ERROR, user="alice")
    step = plan_desktop(alices, None, NOW, stateful=True)
    assert step is not None and step.kind is StepKind.REPAIR
    # Without a user's state in it (a free one, or a stateless pool's), it is replaced.
    for desktop, stateful in ((summary(S.ERROR), True), (alices, False)):
        step = plan_desktop(desktop, None, NOW, stateful=stateful)
        assert step is not None and step.kind is StepKind.RETIRE_FAILED


def test_a_desktop_outside_a_pool_in_error_waits_for_an_administrator() -> None:
    assert plan_desktop(summary(S.ERROR, pool=None), None, NOW) is None


@pytest.mark.parametrize("state", list(DesktopState))
def test_nothing_is_done_while_a_desktop_backs_off(state: DesktopState) -> None:
    later = summary(state, next_attempt_at=NOW + timedelta(seconds=1))
    assert plan_desktop(later, PowerPolicy.SUSPEND, NOW) is None


def test_a_backoff_that_ran_out_lets_the_step_run() -> None:
    for at in (NOW, NOW - timedelta(seconds=1)):
        step = plan_desktop(summary(S.PROVISIONING, next_attempt_at=at), None, NOW)
        assert step is not None and step.kind is StepKind.PROVISION


POWER_STEPS = [
    (PowerPolicy.SUSPEND, PowerState.RUNNING, StepKind.SUSPEND),
    (PowerPolicy.SHUTOFF, PowerState.RUNNING, StepKind.SHUT_OFF),
    (PowerPolicy.RUNNING, PowerState.SHUTOFF, StepKind.START),
    (PowerPolicy.RUNNING, PowerState.SAVED, StepKind.START),
    (PowerPolicy.RUNNING, PowerState.RUNNING, None),
    (PowerPolicy.SUSPEND, PowerState.SAVED, None),
    (PowerPolicy.SUSPEND, PowerState.SHUTOFF, None),  # off already: saving has nothing to keep
    (PowerPolicy.SHUTOFF, PowerState.SHUTOFF, None),
    (PowerPolicy.SHUTOFF, PowerState.SAVED, None),
    (PowerPolicy.RUNNING, PowerState.PAUSED, None),  # says nothing the policy can act on
    (PowerPolicy.RUNNING, PowerState.CRASHED, None),
    (PowerPolicy.RUNNING, PowerState.UNKNOWN, None),
]


@pytest.mark.parametrize(("policy", "power", "kind"), POWER_STEPS)
def test_a_free_ready_desktop_follows_its_pools_power_policy(
        policy: PowerPolicy, power: PowerState, kind: StepKind | None) -> None:
    desktop = summary(S.READY, power=power)
    step = plan_desktop(desktop, policy, NOW)
    if kind is None:
        assert step is None
    else:
        assert step == Step(kind, desktop.id, HOST, S.READY)


def test_power_policy_leaves_assigned_and_poolless_desktops_alone() -> None:
    dedicated = summary(S.READY, user="alice")
    assert plan_desktop(dedicated, PowerPolicy.SUSPEND, NOW) is None
    assert plan_desktop(summary(S.READY, pool=None), None, NOW) is None


def test_a_held_desktop_is_never_powered_by_policy() -> None:
    for state in (S.RESERVED, S.IN_USE, S.IDLE):
        assert plan_desktop(summary(state, user="bob"), PowerPolicy.SHUTOFF, NOW) is None


def test_every_step_kind_has_a_runner() -> None:
    assert set(RUNNERS) == set(StepKind)
