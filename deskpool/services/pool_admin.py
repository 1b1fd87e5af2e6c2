"""The administrator's pool actions, each audited: change any setting, resize, disable and
enable, delete (drained first), roll a version out (with canaries) and back.

Deleting never takes a desktop from its user: the pool is marked ``deleting`` (no new
sessions), the reconciler retires its free desktops at once and each held one as its user
logs off (``logout_outcome``), and removes the pool's row once no desktop is left
(``finish_deletion``); its entitlements and host pins go with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.models import CloneMode, PoolStatus
from deskpool.domain.offline import OfflinePolicy
from deskpool.domain.pools import (
    Assignment,
    OnLogout,
    PoolKind,
    PoolSpec,
    PowerPolicy,
    RevertBy,
)
from deskpool.domain.profile_merge import SecondSession
from deskpool.domain.redirection import redirect_folders
from deskpool.services import template_faults
from deskpool.services.audit import Actor, changed, record_audit
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.hosts import incompatibility
from deskpool.services.pools import (
    PoolService,
    PoolView,
    _view,
    pool_spec,
    stored_offline_policy,
)
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Pool

# What ``update`` may change: every setting of a pool but its name. The kind, assignment and
# template shape what its desktops hold, so they change only while it has none.
UPDATABLE = frozenset(f.name for f in fields(PoolSpec)) - {"name"}
# A user layer is a disk made with each desktop: switching it on or off, or resizing it,
# would leave the pool's desktops unlike one another.
ONLY_WHEN_EMPTY = frozenset({"kind", "assignment", "template", "user_layer_mib"})
_ENUMS: dict[str, Any] = {"kind": PoolKind, "assignment": Assignment, "on_logout": OnLogout,
                          "power_policy": PowerPolicy, "second_session": SecondSession,
                          "revert_by": RevertBy}


def settings_of(uow: UnitOfWork, pool: Pool) -> dict[str, Any]:
    """A pool's settings as the audit log records them (plain values), its pins with them."""
    spec = pool_spec(pool)
    found: dict[str, Any] = {f.name: getattr(spec, f.name) for f in fields(PoolSpec)}
    found = {k: v.value if hasattr(v, "value") else v for k, v in found.items()}
    found["offline"] = spec.offline.to_dict()
    found["hosts"] = sorted(uow.hosts.get(h).name for h in uow.pool_hosts.pinned(pool.id))
    found["status"] = pool.status.value
    return found


def _coerce(name: str, value: Any) -> Any:
    if name in ("profile_exclusions", "redirect_folders") and isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    if name == "redirect_folders" and isinstance(value, str):
        return redirect_folders(value)
    if name == "offline" and not isinstance(value, OfflinePolicy):
        raise InvalidInput("offline must be an offline policy (an object of its fields)")
    kind = _ENUMS.get(name)
    if kind is None or value is None:
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidInput(f"{name} {value!r} is not one of {allowed}") from None


class PoolAdmin:
    def __init__(self, ctx: ServiceContext, actor: Actor | None = None) -> None:
        self.ctx = ctx
        self.actor = actor
        self.pools = PoolService(ctx)

    def create(self, spec: PoolSpec, *, host: str | None = None,
               hosts: Sequence[str] = ()) -> PoolView:
        view = self.pools.create(spec, host=host, hosts=hosts)
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(view.name)
            record_audit(uow, self.actor, "pool.create", f"pool/{view.name}",
                         f"created pool {view.name}", new=settings_of(uow, pool),
                         pool=view.name)
            uow.commit()
        return view

    def update(self, name: str, changes: Mapping[str, Any]) -> PoolView:
        """Change the given settings (``hosts``: the pins, [] for any host); the rest stay.
        Bad values change nothing (``InvalidInput`` naming the field)."""
        unknown = sorted(set(changes) - UPDATABLE - {"hosts"})
        if unknown:
            raise InvalidInput(f"pool settings {', '.join(unknown)} do not exist or cannot "
                               "be changed")
        with self.ctx.uow() as uow:
            pool = self._live(uow, name)
            before = settings_of(uow, pool)
            changes = dict(changes)
            if isinstance(changes.get("offline"), Mapping):
                # The fields given change, the rest of the pool's policy stays.
                given = {k: v for k, v in changes["offline"].items() if v is not None}
                changes["offline"] = OfflinePolicy.from_dict(
                    {**pool_spec(pool).offline.to_dict(), **given})
            spec = replace(pool_spec(pool), **{k: _coerce(k, v) for k, v in changes.items()
                                              if k != "hosts"}).validate()
            wanted = {k for k in ONLY_WHEN_EMPTY if k in changes
                      and getattr(spec, k) != getattr(pool_spec(pool), k)}
            if wanted and uow.pools.desktops(pool.id):
                raise Conflict(f"pool {name!r} has desktops, so its {', '.join(sorted(wanted))} "
                               "cannot change; delete the pool and make a new one (or roll "
                               "out a new version of its template)")
            if "template" in wanted:
                template = uow.templates.get_by_name(spec.template)
                version = uow.versions.latest(template.id)
                pool.template, pool.current_version_id = template, version.id
                pool.previous_version_id = None
            version = uow.versions.get(pool.current_version_id)
            if spec.clone_mode == "instant" and pool.clone_mode is not CloneMode.INSTANT \
                    and not uow.memory_states.for_version(version.id):
                raise InvalidInput(f"pool {name!r}: version {version.number} has no saved "
                                   "memory state, which instant clones restore")
            if "hosts" in changes:
                self._pin(uow, pool, version, list(changes["hosts"] or []))
            for f in fields(PoolSpec):
                if f.name in ("name", "template"):
                    continue
                value = getattr(spec, f.name)
                if f.name == "clone_mode":
                    value = CloneMode(value)
                elif f.name in ("profile_exclusions", "redirect_folders"):
                    value = "\n".join(value)
                elif f.name == "offline":
                    pool.offline_policy = stored_offline_policy(value)
                    continue
                setattr(pool, f.name, value)
            uow.flush()
            old, new = changed(before, settings_of(uow, pool))
            if new:
                record_audit(uow, self.actor, "pool.update", f"pool/{name}",
                             f"changed pool {name}: {', '.join(sorted(new))}", old=old,
                             new=new, pool=name)
            uow.commit()
            return _view(uow, pool)

    def resize(self, name: str, *, min_size: int | None = None, max_size: int | None = None,
               spare: int | None = None) -> PoolView:
        sizes = {"min_size": min_size, "max_size": max_size, "spare": spare}
        return self.update(name, {k: v for k, v in sizes.items() if v is not None})

    def set_enabled(self, name: str, enabled: bool) -> PoolView:
        """Disabled: no new sessions (users keep the desktops they hold); enabled again."""
        with self.ctx.uow() as uow:
            pool = self._live(uow, name)
            before = pool.status
            pool.status = PoolStatus.ENABLED if enabled else PoolStatus.DISABLED
            if pool.status is not before:
                verb = "enabled" if enabled else "disabled"
                record_audit(uow, self.actor, f"pool.{verb[:-1]}", f"pool/{name}",
                             f"{verb} pool {name}", old={"status": before.value},
                             new={"status": pool.status.value}, pool=name)
            uow.commit()
            return _view(uow, pool)

    def clear_fault(self, name: str) -> PoolView:
        """The administrator says the pool's template disk is fine again (restored by hand):
        its fault is cleared and the next pass tries at once (marking it again if it is
        not fine). ``Conflict`` when the pool has no fault."""
        with self.ctx.uow() as uow:
            pool = self._live(uow, name)
            before = {"fault": pool.fault}
            who = self.actor.name if self.actor is not None else "an administrator"
            if not template_faults.clear_by_admin(uow, pool, who):
                raise Conflict(f"pool {name!r} has no template fault to clear")
            record_audit(uow, self.actor, "pool.clear-fault", f"pool/{name}",
                         f"cleared the template fault of pool {name}", old=before,
                         new={"fault": None}, pool=name)
            uow.commit()
            return _view(uow, pool)

    def delete(self, name: str) -> PoolView:
        """Mark the pool for deletion: no new sessions; its desktops are retired as they
        free up and the pool goes when none is left (the reconciler does both)."""
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            if pool.status is PoolStatus.DELETING:
                raise Conflict(f"pool {name!r} is already being deleted")
            before = pool.status
            pool.status = PoolStatus.DELETING
            held = sum(1 for d in uow.pools.desktops(pool.id) if d.assigned_user)
            record_audit(uow, self.actor, "pool.delete", f"pool/{name}",
                         f"deleting pool {name} ({held} desktops held by users are retired "
                         "as they log off)", old={"status": before.value},
                         new={"status": PoolStatus.DELETING.value}, pool=name)
            uow.commit()
            return _view(uow, pool)

    def rollout(self, name: str, version: int | None = None,
                canary: int | None = None) -> PoolView:
        """Make new desktops from ``version`` (default: the latest); with ``canary``, that
        many new ones are ready before free old ones are replaced."""
        with self.ctx.uow(read_only=True) as uow:
            pool = self._live(uow, name)
            before = {"version": pool.current_version.number, "canary": pool.canary}
        if canary is not None:
            self._quiet_update(name, {"canary": canary})
        view = self.pools.rollout(name, version)
        self._audit_version(name, "pool.rollout", before, f"rolled pool {name} out to "
                            f"version {view.version}")
        return view

    def rollback(self, name: str) -> PoolView:
        with self.ctx.uow(read_only=True) as uow:
            pool = self._live(uow, name)
            before = {"version": pool.current_version.number, "canary": pool.canary}
        view = self.pools.rollback(name)
        self._audit_version(name, "pool.rollback", before, f"rolled pool {name} back to "
                            f"version {view.version}")
        return view

    # --- helpers ---------------------------------------------------------------------------

    def _quiet_update(self, name: str, changes: Mapping[str, Any]) -> None:
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            spec = replace(pool_spec(pool), **changes).validate()
            pool.canary = spec.canary
            uow.commit()

    def _audit_version(self, name: str, action: str, before: dict[str, Any],
                       message: str) -> None:
        with self.ctx.uow() as uow:
            pool = uow.pools.get_by_name(name)
            after = {"version": pool.current_version.number, "canary": pool.canary}
            record_audit(uow, self.actor, action, f"pool/{name}", message, old=before,
                         new=after, pool=name)
            uow.commit()

    @staticmethod
    def _live(uow: UnitOfWork, name: str) -> Pool:
        pool = uow.pools.get_by_name(name)
        if pool.status is PoolStatus.DELETING:
            raise Conflict(f"pool {name!r} is being deleted; it can no longer be changed")
        return pool

    @staticmethod
    def _pin(uow: UnitOfWork, pool: Pool, version: Any, names: list[str]) -> None:
        hosts = [uow.hosts.get_by_name(h) for h in names]
        problems = [p for p in (incompatibility(version, h) for h in hosts) if p]
        if problems:
            raise InvalidInput(f"pool {pool.name!r} cannot be pinned there: "
                               + "; ".join(problems))
        uow.pool_hosts.unpin_all(pool.id)
        for host in hosts:
            uow.pool_hosts.pin(pool.id, host.id)


def finish_deletion(uow: UnitOfWork, pool: Pool) -> bool:
    """Remove a pool being deleted once no desktop of it is left (its grants and pins go
    with it); whether it went. Run by the reconciler in its pass."""
    if pool.status is not PoolStatus.DELETING or uow.pools.desktops(pool.id):
        return False
    name = pool.name
    uow.pools.delete(pool)
    record_event(uow, "pool-deleted", f"pool {name} deleted: its last desktop was retired",
                 pool=name)
    return True
