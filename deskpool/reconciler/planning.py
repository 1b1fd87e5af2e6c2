"""What a pool and each desktop need next, decided from their rows alone (pure: no I/O, easy
to test at scale).

The reconciler reads a pool's desktops, asks ``plan_pool`` what to do, and carries the answer
out through the factory and the state table. For each desktop it asks ``plan_desktop`` for the
one step it needs now, as data (a ``Step``); ``reconciler.steps`` says how each kind is run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from deskpool.domain.models import PowerState
from deskpool.domain.pools import PoolKind, PoolSpec, PowerPolicy
from deskpool.domain.states import HELD_STATES, NOT_LIVE_STATES, DesktopState, DesktopTask

S = DesktopState
MAX_BACKOFF = timedelta(minutes=10)


def backoff(retries: int) -> timedelta:
    """How long a desktop waits before its next try after ``retries`` failures in a row."""
    return min(timedelta(seconds=5 * 2 ** max(retries - 1, 0)), MAX_BACKOFF)


@dataclass(frozen=True)
class DesktopFacts:
    id: uuid.UUID
    state: DesktopState
    version_id: uuid.UUID
    assigned: bool
    created_at: datetime


@dataclass
class PoolPlan:
    retire: list[uuid.UUID] = field(default_factory=list)
    # Ready desktops of another version whose user layers are rebased onto the pool's.
    rebase: list[uuid.UUID] = field(default_factory=list)
    create: int = 0
    reasons: list[str] = field(default_factory=list)


def plan_pool(
    spec: PoolSpec, current_version: uuid.UUID, desktops: list[DesktopFacts], now: datetime,
    *, rebase_failed: frozenset[uuid.UUID] = frozenset(),
) -> PoolPlan:
    """``rebase_failed``: desktops whose last rebase onto ``current_version`` failed; they
    wait for their user's next logoff or an administrator rather than failing every pass."""
    plan = PoolPlan()
    # A stateful pool's failed desktop that is its user's is repaired, not replaced
    # (``plan_desktop``): it keeps its seat, so no second desktop is made beside it.
    repaired = spec.kind is PoolKind.STATEFUL
    live = [d for d in desktops if d.state not in NOT_LIVE_STATES
            or (repaired and d.state is S.ERROR and d.assigned)]
    free_ready = [d for d in live if d.state is S.READY and not d.assigned]

    # Template rollout: free desktops of another version go, once ``canary`` new ones are ready.
    # A layered stateful pool's ready ones (free, or waiting for their dedicated user) hold
    # their users' layers: rebased onto the new version instead, never retired.
    layered = spec.kind is PoolKind.STATEFUL and spec.user_layer_mib > 0
    outdated = [d for d in free_ready if d.version_id != current_version]
    if layered:
        outdated = [d for d in live if d.state is S.READY and d.version_id != current_version
                    and d.id not in rebase_failed]
    new_ready = sum(1 for d in live if d.version_id == current_version
                    and d.state is S.READY)
    new_live = sum(1 for d in live if d.version_id == current_version)
    if outdated:
        if new_ready >= spec.canary and layered:
            plan.rebase += [d.id for d in outdated]
            plan.reasons.append(f"rollout: rebasing {len(outdated)} old-version desktops' "
                                "user layers")
        elif new_ready >= spec.canary:
            plan.retire += [d.id for d in outdated]
            plan.reasons.append(f"rollout: retiring {len(outdated)} free old-version desktops")
        else:
            # Canaries first: make them even if the pool is otherwise full (never above max).
            want = min(spec.canary - new_live, spec.max_size - len(live))
            if want > 0:
                plan.create += want
                plan.reasons.append(f"rollout: {want} canary desktops of the new version")

    # Maximum age: free desktops older than the limit are replaced.
    if spec.max_age_s is not None:
        limit = now - timedelta(seconds=spec.max_age_s)
        aged = [d.id for d in free_ready if d.created_at < limit and d.id not in plan.retire]
        if aged:
            plan.retire += aged
            plan.reasons.append(f"max age: retiring {len(aged)} desktops")

    remaining = len(live) - len(plan.retire)
    # A dedicated desktop stays its user's between sessions: held even while it waits, ready.
    held = sum(1 for d in live if d.state in HELD_STATES or d.assigned)
    desired = spec.desired_total(held)
    if remaining + plan.create < desired:
        missing = desired - remaining - plan.create
        plan.create += missing
        plan.reasons.append(f"sizing: {missing} more to reach {desired}")
    elif remaining > desired:
        # Scale down by retiring free ready desktops only; never take one from a user.
        spare_ready = [d.id for d in free_ready if d.id not in plan.retire]
        extra = min(remaining - desired, len(spare_ready))
        if extra > 0:
            plan.retire += spare_ready[:extra]
            plan.reasons.append(f"sizing: retiring {extra} above the wanted {desired}")
    plan.create = max(0, min(plan.create, spec.max_size - (len(live) - len(plan.retire))))
    return plan


# --- one desktop's next step ---------------------------------------------------------------


class StepKind(StrEnum):
    """What the reconciler does to one desktop in a pass (at most one step each)."""

    PROVISION = "provision"  # clone, define and boot, then confirm its identity
    MAKE_READY = "make-ready"  # booted: confirm its identity through the guest agent
    RECYCLE = "recycle"  # back to ready after a user, reverted or as it is (``task``)
    REMOVE = "remove"  # retiring, retired or deleting: VM and row go
    RETIRE_FAILED = "retire-failed"  # a pool desktop in error is replaced, not repaired
    REPAIR = "repair"  # ...unless it holds its user's state: booted and confirmed again
    SUSPEND = "suspend"  # power policy of a free desktop: memory saved to disk
    SHUT_OFF = "shut-off"
    START = "start"


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    desktop_id: uuid.UUID
    host_id: uuid.UUID
    # The state the step starts from: a desktop found in another one when the step begins
    # has been moved on by someone else and is left to them.
    state: DesktopState
    task: DesktopTask | None = None


class DesktopView(Protocol):
    """The facts ``plan_desktop`` reads (``store.desktops.DesktopSummary`` has them)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def host_id(self) -> uuid.UUID: ...
    @property
    def pool_id(self) -> uuid.UUID | None: ...
    @property
    def state(self) -> DesktopState: ...
    @property
    def power_state(self) -> PowerState: ...
    @property
    def task(self) -> DesktopTask | None: ...
    @property
    def assigned_user(self) -> str | None: ...
    @property
    def next_attempt_at(self) -> datetime | None: ...


# States whose step depends on nothing but the state.
_STEP_OF_STATE: dict[DesktopState, StepKind] = {
    S.PROVISIONING: StepKind.PROVISION,
    S.CUSTOMIZING: StepKind.MAKE_READY,
    S.RECYCLING: StepKind.RECYCLE,
    S.RETIRING: StepKind.REMOVE,
    S.RETIRED: StepKind.REMOVE,
    S.DELETING: StepKind.REMOVE,
}

# A free ready desktop's power state against its pool's power policy: the step that brings
# them in line (none when they agree, or when the power state says nothing, e.g. paused).
_POWER_STEPS: dict[tuple[PowerPolicy, PowerState], StepKind] = {
    (PowerPolicy.SUSPEND, PowerState.RUNNING): StepKind.SUSPEND,
    (PowerPolicy.SHUTOFF, PowerState.RUNNING): StepKind.SHUT_OFF,
    (PowerPolicy.RUNNING, PowerState.SHUTOFF): StepKind.START,
    (PowerPolicy.RUNNING, PowerState.SAVED): StepKind.START,
}


def plan_desktop(
    desktop: DesktopView, power_policy: PowerPolicy | None, now: datetime, *,
    stateful: bool = False,
) -> Step | None:
    """The one step ``desktop`` needs now, or None. ``power_policy`` is its pool's (None for a
    desktop outside a pool), ``stateful`` whether that pool keeps its users' changes. Whether
    its host answers is the caller's to check."""
    if desktop.next_attempt_at is not None and desktop.next_attempt_at > now:
        return None  # backing off after a failure
    state = desktop.state
    kind = _STEP_OF_STATE.get(state)
    if kind is None and state is S.ERROR and desktop.pool_id is not None:
        # A pool desktop that failed is replaced; one holding its user's changes is never
        # thrown away for a failure: it is repaired (retried with backoff) until it works
        # or an administrator decides otherwise.
        holds_user_state = stateful and desktop.assigned_user is not None
        kind = StepKind.REPAIR if holds_user_state else StepKind.RETIRE_FAILED
    if (kind is None and state is S.READY and desktop.assigned_user is None
            and power_policy is not None):
        kind = _POWER_STEPS.get((power_policy, desktop.power_state))
    if kind is None:
        return None
    return Step(kind, desktop.id, desktop.host_id, state, desktop.task)
