"""Pools: create them, resize them and roll a new template version out (and back). Users get
and give back pool desktops through the broker (``deskpool.broker.handover`` and
``deskpool.broker.sessions``, which applies ``logout_outcome``). The reconciler does the slow
work: it keeps pools at size and carries out recycle and retire."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.models import CloneMode, PoolStatus
from deskpool.domain.naming import first_free_number, render
from deskpool.domain.offline import OfflinePolicy
from deskpool.domain.pools import OnLogout, PoolKind, PoolSpec, RevertBy
from deskpool.domain.profile_merge import SecondSession
from deskpool.domain.states import DesktopState, DesktopTask
from deskpool.scheduler.facts import Strategy
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory
from deskpool.services.hosts import incompatibility
from deskpool.services.placement import Placer
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop, Pool

S = DesktopState


@dataclass(frozen=True)
class PoolView:
    id: uuid.UUID
    name: str
    template: str
    version: int
    previous_version: int | None
    kind: str
    assignment: str
    clone_mode: str
    min_size: int
    max_size: int
    spare: int
    counts: dict[str, int]
    status: str = "enabled"  # a PoolStatus value
    session_start_timeout_s: int = 150
    roaming_profiles: bool = False
    second_session: str = "merge"  # a SecondSession value
    revert_by: str = "snapshot"  # a RevertBy value
    user_layer_mib: int = 0  # the user layer disk of each desktop; 0: none
    profile_exclusions: tuple[str, ...] = ()
    redirect_folders: tuple[str, ...] = ()  # on the user's file share
    balance: bool = False  # the load balancer may move its desktops
    # Its template version's disk cannot be used (see ``template_faults``): why, since when,
    # tries failed, next try.
    fault: str | None = None
    fault_since: datetime | None = None
    fault_failures: int = 0
    fault_retry_at: datetime | None = None
    offline: OfflinePolicy = field(default_factory=OfflinePolicy)


def offline_policy(pool: Pool) -> OfflinePolicy:
    """A pool's offline policy as stored (none stored: no offline use)."""
    if pool.offline_policy is None:
        return OfflinePolicy()
    return OfflinePolicy.from_dict(json.loads(pool.offline_policy))


def stored_offline_policy(policy: OfflinePolicy) -> str | None:
    return None if policy == OfflinePolicy() else json.dumps(policy.to_dict(), sort_keys=True)


def exclusion_list(stored: str) -> tuple[str, ...]:
    """A pool's profile exclusions (or redirected folders) as stored, one per line, back
    to a tuple."""
    return tuple(line for line in stored.split("\n") if line)


def pool_spec(pool: Pool) -> PoolSpec:
    return PoolSpec(
        name=pool.name, template=pool.template.name, kind=pool.kind, assignment=pool.assignment,
        min_size=pool.min_size, max_size=pool.max_size, spare=pool.spare,
        naming_pattern=pool.naming_pattern, clone_mode=pool.clone_mode.value,
        on_logout=pool.on_logout, revert_by=RevertBy(pool.revert_by), one_time=pool.one_time,
        user_layer_mib=pool.user_layer_mib,
        max_age_s=pool.max_age_s, power_policy=pool.power_policy, canary=pool.canary,
        reservation_timeout_s=pool.reservation_timeout_s, idle_timeout_s=pool.idle_timeout_s,
        disconnect_timeout_s=pool.disconnect_timeout_s, placement=pool.placement,
        session_start_timeout_s=pool.session_start_timeout_s,
        roaming_profiles=pool.roaming_profiles,
        second_session=SecondSession(pool.second_session),
        profile_exclusions=exclusion_list(pool.profile_exclusions),
        redirect_folders=exclusion_list(pool.redirect_folders),
        balance=pool.balance,
        offline=offline_policy(pool),
    )


def _view(uow: UnitOfWork, pool: Pool, *, counts: dict[str, int] | None = None,
          previous: int | None = None) -> PoolView:
    """The pool as the edges show it. ``counts`` (desktops per state) and ``previous`` (the
    previous version's number) are read here unless given (a listing reads every pool's at
    once)."""
    if counts is None:
        counts = uow.desktop_listings.state_counts_by_pool(pool.id).get(pool.id, {})
    if previous is None and pool.previous_version_id is not None:
        previous = uow.versions.get(pool.previous_version_id).number
    return PoolView(
        id=pool.id, name=pool.name, template=pool.template.name,
        version=pool.current_version.number, previous_version=previous,
        kind=pool.kind.value, assignment=pool.assignment.value,
        clone_mode=pool.clone_mode.value, min_size=pool.min_size, max_size=pool.max_size,
        spare=pool.spare, counts=counts, status=pool.status.value,
        session_start_timeout_s=pool.session_start_timeout_s,
        roaming_profiles=pool.roaming_profiles, second_session=pool.second_session,
        revert_by=pool.revert_by, user_layer_mib=pool.user_layer_mib,
        fault=pool.fault, fault_since=pool.fault_since,
        fault_failures=pool.fault_failures, fault_retry_at=pool.fault_retry_at,
        profile_exclusions=exclusion_list(pool.profile_exclusions),
        redirect_folders=exclusion_list(pool.redirect_folders),
        balance=pool.balance,
        offline=offline_policy(pool),
    )


class PoolService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def create(self, spec: PoolSpec, *, host: str | None = None,
               hosts: Sequence[str] = ()) -> PoolView:
        """Store a validated pool; the reconciler fills it. ``hosts`` (or one ``host``) pins
        it; each must be able to run the template. Nothing is stored on bad input."""
        spec = spec.validate()
        pins = [*hosts, *([host] if host else [])]
        with self.ctx.uow() as uow:
            if uow.pools.find_by_name(spec.name) is not None:
                raise Conflict(f"a pool named {spec.name!r} already exists")
            template = uow.templates.get_by_name(spec.template)
            version = uow.versions.latest(template.id)
            pinned = [uow.hosts.get_by_name(h) for h in pins]
            problems = [p for p in (incompatibility(version, h) for h in pinned) if p]
            if problems:
                raise InvalidInput(f"pool {spec.name!r} cannot be pinned there: "
                                   + "; ".join(problems))
            if spec.clone_mode == "instant" and not uow.memory_states.for_version(
                    version.id):
                raise InvalidInput(
                    f"template {template.name!r} version {version.number} has no saved memory "
                    "state, which instant clones restore: capture one first "
                    f"('deskpool template capture-state {template.name}')"
                )
            pool = Pool(
                name=spec.name, template=template, kind=spec.kind, assignment=spec.assignment,
                min_size=spec.min_size, max_size=spec.max_size, spare=spec.spare,
                naming_pattern=spec.naming_pattern, clone_mode=CloneMode(spec.clone_mode),
                on_logout=spec.on_logout, revert_by=spec.revert_by.value,
                user_layer_mib=spec.user_layer_mib,
                one_time=spec.one_time, max_age_s=spec.max_age_s,
                power_policy=spec.power_policy, canary=spec.canary,
                reservation_timeout_s=spec.reservation_timeout_s,
                idle_timeout_s=spec.idle_timeout_s,
                disconnect_timeout_s=spec.disconnect_timeout_s,
                session_start_timeout_s=spec.session_start_timeout_s,
                roaming_profiles=spec.roaming_profiles, second_session=spec.second_session,
                profile_exclusions="\n".join(spec.profile_exclusions),
                redirect_folders="\n".join(spec.redirect_folders),
                current_version_id=version.id, placement=spec.placement,
                balance=spec.balance,
                offline_policy=stored_offline_policy(spec.offline),
            )
            uow.pools.add(pool)
            for pinned_host in pinned:
                uow.pool_hosts.pin(pool.id, pinned_host.id)
            uow.commit()
            return _view(uow, pool)

    def resize(self, name: str, *, min_size: int | None = None, max_size: int | None = None,
               spare: int | None = None) -> PoolView:
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            current = pool_spec(pool)
            spec = replace(
                current,
                min_size=current.min_size if min_size is None else min_size,
                max_size=current.max_size if max_size is None else max_size,
                spare=current.spare if spare is None else spare,
            ).validate()
            pool.min_size, pool.max_size, pool.spare = spec.min_size, spec.max_size, spec.spare
            uow.commit()
            return _view(uow, pool)

    def get(self, name: str) -> PoolView:
        with self.ctx.uow(read_only=True) as uow:
            return _view(uow, uow.pools.get_by_name(name))

    def list(self) -> list[PoolView]:
        with self.ctx.uow(read_only=True) as uow:
            pools = uow.pools.list_with_versions()
            counts = uow.desktop_listings.state_counts_by_pool()
            previous = uow.versions.numbers(
                {p.previous_version_id for p in pools if p.previous_version_id is not None})
            return [_view(uow, p, counts=counts.get(p.id, {}),
                          previous=previous.get(p.previous_version_id)
                          if p.previous_version_id is not None else None)
                    for p in pools]

    # --- template version rollout ----------------------------------------------------------

    def rollout(self, name: str, version: int | None = None) -> PoolView:
        """Make new desktops from ``version`` (default: the template's latest). Free desktops
        of older versions are replaced by the reconciler (after ``canary`` new ones are ready),
        held ones as their users leave."""
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            target = (uow.versions.get_by_number(pool.template_id, version) if version
                      else uow.versions.latest(pool.template_id))
            if target.id == pool.current_version_id:
                raise Conflict(f"pool {name!r} already runs version {target.number}")
            pool.previous_version_id, pool.current_version_id = (pool.current_version_id,
                                                                  target.id)
            uow.commit()
            return _view(uow, pool)

    def rollback(self, name: str) -> PoolView:
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            if pool.previous_version_id is None:
                raise Conflict(f"pool {name!r} has no earlier version to roll back to")
            pool.current_version_id, pool.previous_version_id = (pool.previous_version_id,
                                                                 pool.current_version_id)
            uow.commit()
            return _view(uow, pool)


def pinned_hosts(uow: UnitOfWork, pool_id: uuid.UUID) -> set[uuid.UUID] | None:
    """The hosts a pool is pinned to; None when it may use any."""
    return uow.pool_hosts.pinned(pool_id) or None


def insert_pool_desktop(uow: UnitOfWork, factory: DesktopFactory, pool: Pool,
                        taken_macs: set[str], *, assigned_user: str | None = None,
                        placer: Placer | None = None,
                        prefer: frozenset[uuid.UUID] = frozenset()) -> Desktop:
    """A new desktop row for the pool (provisioning), placed by the scheduler; the
    reconciler builds it. Given an ``assigned_user``, it is made for that user, who gets it
    once it is ready; ``prefer``: the hosts holding their roaming profile, preferred among
    otherwise equal ones. ``NoValidHost`` when no host can take it."""
    # Brokers and reconcilers insert into one pool one at a time (the row lock on PostgreSQL;
    # SQLite writers are serialized anyway), so two never pick the same next name.
    uow.pools.lock(pool.id)
    placer = placer or Placer(uow)
    host, placement = placer.place(
        pool.current_version, pool.clone_mode, what=f"pool {pool.name!r}",
        allowed=pinned_hosts(uow, pool.id), strategy=Strategy(pool.placement), prefer=prefer)
    # The names in use are read once per unit of work (no other path adds desktops in a unit
    # of work that inserts pool desktops) and each pattern's search resumes where it stopped,
    # so inserting many desktops in one pass is not quadratic in the desktops there are.
    info = uow.scratch
    if "taken_names" not in info:
        info["taken_names"] = uow.desktops.names()
    taken: set[str] = info["taken_names"]
    resume: dict[str, int] = info.setdefault("next_name_number", {})
    n = first_free_number(pool.naming_pattern, taken, start=resume.get(pool.naming_pattern, 1))
    resume[pool.naming_pattern] = n + 1
    name = render(pool.naming_pattern, n)
    taken.add(name)
    desktop = factory.new_row(name=name, version_id=pool.current_version_id, host_id=host.id,
                              clone_mode=pool.clone_mode, taken_macs=taken_macs,
                              pool_id=pool.id)
    desktop.assigned_user = assigned_user
    desktop.placement_reason = placement.reason
    uow.desktops.add(desktop)
    return desktop


def rebases_layers(pool: Pool) -> bool:
    """Whether the pool's outdated desktops are rebased onto its version (their user layers
    carried over) rather than kept on theirs: a stateful pool with user layers."""
    return pool.kind is PoolKind.STATEFUL and pool.user_layer_mib > 0


def failed_rebases(uow: UnitOfWork, pool: Pool) -> frozenset[uuid.UUID]:
    """The pool's desktops whose newest rebase onto its version failed: not rebased again
    by the reconciler (each try a failing boot), only at their user's logoff or on an
    administrator's request."""
    if not rebases_layers(pool):
        return frozenset()
    return uow.layer_rebases.failed_onto(pool.id, pool.current_version.number)


def logout_outcome(pool: Pool, desktop: Desktop) -> tuple[DesktopState, DesktopTask]:
    """What a user's logout does to a pool desktop: (next state, task for the reconciler).

    A desktop of an older template version is replaced at logout, unless it holds a user's
    state (a stateful pool's desktop): a rollout never destroys that. A layered one (the
    pool's ``user_layer_mib``) has its user layer rebased onto the pool's version; one without
    a layer stays on its version, its user's. Only the administrator's own policy (one-time
    desktops, retire on logout) retires such a desktop."""
    outdated = desktop.template_version_id != pool.current_version_id
    replace_outdated = outdated and pool.kind is not PoolKind.STATEFUL
    # A pool being deleted keeps its desktops only while their users hold them.
    deleting = pool.status is PoolStatus.DELETING
    if pool.one_time or pool.on_logout is OnLogout.RETIRE or replace_outdated or deleting:
        return S.RETIRING, DesktopTask.RETIRE
    if outdated and rebases_layers(pool):
        return S.RECYCLING, DesktopTask.REBASE
    if pool.on_logout is OnLogout.RECYCLE_REVERT:
        if pool.revert_by == RevertBy.BOOT:
            return S.RECYCLING, DesktopTask.REVERT  # a fresh overlay: no snapshot needed
        if not desktop.has_factory_snapshot:
            # Nothing to go back to (made before the pool reverted): a fresh desktop, never
            # the last user's leftovers handed to the next.
            return S.RETIRING, DesktopTask.RETIRE
        return S.RECYCLING, DesktopTask.REVERT
    return S.RECYCLING, DesktopTask.KEEP
