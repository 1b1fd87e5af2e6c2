"""What a pool needs, decided from its rows alone (pure: no I/O, easy to test at scale).

The reconciler reads a pool's desktops, asks ``plan_pool`` what to do, and carries the answer
out through the factory and the state table.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from deskpool.domain.pools import PoolSpec
from deskpool.domain.states import HELD_STATES, NOT_LIVE_STATES, DesktopState

S = DesktopState


@dataclass(frozen=True)
class DesktopFacts:
    id: uuid.UUID
    state: str
    version_id: uuid.UUID
    assigned: bool
    created_at: datetime


@dataclass
class PoolPlan:
    retire: list[uuid.UUID] = field(default_factory=list)
    create: int = 0
    reasons: list[str] = field(default_factory=list)


def plan_pool(
    spec: PoolSpec, current_version: uuid.UUID, desktops: list[DesktopFacts], now: datetime
) -> PoolPlan:
    plan = PoolPlan()
    live = [d for d in desktops if d.state not in NOT_LIVE_STATES]
    free_ready = [d for d in live if d.state == S.READY.value and not d.assigned]

    # Template rollout: free desktops of another version go, once ``canary`` new ones are ready.
    outdated = [d for d in free_ready if d.version_id != current_version]
    new_ready = sum(1 for d in live if d.version_id == current_version
                    and d.state == S.READY.value)
    new_live = sum(1 for d in live if d.version_id == current_version)
    if outdated:
        if new_ready >= spec.canary:
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
