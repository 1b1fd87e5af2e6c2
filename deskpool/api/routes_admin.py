"""The administrator's routes: hosts, templates, pools and entitlements, desktops with their
live state and why they are stuck, sessions, events and logon phase timings."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query

from deskpool.api.deps import AdminActor, AdminUser, ServicesDep
from deskpool.api.schemas import (
    DesktopAdminView,
    DrainRequest,
    GrantRequest,
    GrantView,
    HostAdminView,
    HostCreate,
    HostPath,
    HostSetBalance,
    HostSetPath,
    HostSetView,
    HostUpdate,
    MigrateRequest,
    MigrationView,
    PoolAdminView,
    PoolCreate,
    PoolPath,
    PrincipalKind,
    SessionAdminView,
    SharedStorageRequest,
    StateResponse,
    TemplatePath,
    TemplatePublish,
    TemplateVersionAdminView,
    UserAdminView,
    UserCreate,
    UserPath,
    errors,
)
from deskpool.broker.user_admin import UserAdmin
from deskpool.domain.errors import InvalidInput, NotFound
from deskpool.domain.models import Customization
from deskpool.domain.offline import OfflinePolicy
from deskpool.domain.pools import PoolSpec
from deskpool.domain.states import DesktopState
from deskpool.images.builder import load_cached_image
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.services.audit import audit
from deskpool.services.events import recent_events
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.migration import MigrationService
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

# Every admin route may answer these; the ones a single route adds are on that route.
router = APIRouter(prefix="/api/v1/admin", tags=["admin"],
                   responses=errors(400, 401, 403, 413, 422))
Row = dict[str, Any]


@router.get("/hosts", response_model=list[HostAdminView])
def hosts(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    return [asdict(h) for h in HostService(svc.ctx).list()]


@router.post("/hosts", response_model=HostAdminView, responses=errors(409, 502, 503))
def add_host(body: HostCreate, actor: AdminActor, svc: ServicesDep) -> Row:
    limits = HostLimits(body.cpu_overcommit, body.memory_overcommit, body.max_desktops,
                        body.max_provisioning, body.transfer_slots)
    return asdict(HostService(svc.ctx).add(body.name, body.uri, limits=limits,
                                           shared_storage=body.shared_storage,
                                           host_set=body.host_set, actor=actor))


@router.put("/hosts/{name}/shared-storage", response_model=HostAdminView,
            responses=errors(404))
def set_shared_storage(name: HostPath, body: SharedStorageRequest, actor: AdminActor,
                       svc: ServicesDep) -> Row:
    """Which shared storage the host's storage directory is on (null: its own). Stateful
    desktops of a host lost whole are restarted on a host of the same shared storage."""
    return asdict(HostService(svc.ctx).set_shared_storage(name, body.shared_storage,
                                                          actor=actor))


@router.patch("/hosts/{name}", response_model=HostAdminView, responses=errors(404))
def update_host(name: HostPath, body: HostUpdate, actor: AdminActor, svc: ServicesDep) -> Row:
    """Put a host in a host set (null: the default set)."""
    return asdict(HostService(svc.ctx).set_host_set(name, body.host_set, actor=actor))


@router.get("/host-sets", response_model=list[HostSetView])
def host_sets(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    return [asdict(s) for s in HostService(svc.ctx).sets()]


@router.put("/host-sets/{name}/balance", response_model=HostSetView, responses=errors(404))
def balance_host_set(name: HostSetPath, body: HostSetBalance, actor: AdminActor,
                     svc: ServicesDep) -> Row:
    """Turn a host set's load balancing on or off (404 when no host is in the set)."""
    return asdict(HostService(svc.ctx).set_balance(name, body.balance, actor=actor))


@router.post("/hosts/{name}/drain", response_model=HostAdminView, responses=errors(404, 409))
def drain_host(name: HostPath, body: DrainRequest, actor: AdminActor, svc: ServicesDep) -> Row:
    return asdict(HostService(svc.ctx).drain(name, grace=timedelta(seconds=body.grace_s),
                                             actor=actor))


@router.post("/hosts/{name}/enable", response_model=HostAdminView,
             responses=errors(404, 409))
def enable_host(name: HostPath, actor: AdminActor, svc: ServicesDep) -> Row:
    return asdict(HostService(svc.ctx).enable(name, actor=actor))


@router.get("/templates", response_model=list[TemplateVersionAdminView])
def templates(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    return [asdict(v) for v in TemplateService(svc.ctx).list_versions()]


@router.post("/templates/{name}/versions", response_model=TemplateVersionAdminView,
             responses=errors(404, 409))
def publish_template(name: TemplatePath, body: TemplatePublish, actor: AdminActor,
                     svc: ServicesDep) -> Row:
    """Publish the next version of ``name`` (made if new) from image files the broker can
    read or an image built on it, with the administrator's cloud-init user data and join
    hook when given. A built image must be built already (no build here)."""
    recipe_hash, memory_mib, built = None, body.memory_mib, None
    if body.built_flavor is not None:
        if body.image is not None:
            raise InvalidInput("give either image or built_flavor, not both")
        recipe = recipe_for(body.built_flavor)
        built = load_cached_image(svc.ctx.settings.image_cache_dir, recipe)
        if built is None:
            raise NotFound(f"no {recipe.flavor} image is built on the broker: run "
                           f"'deskpool image build --flavor {recipe.flavor}' first")
        files, recipe_hash = ImageFiles.from_guest_image(built), built.recipe_hash
        memory_mib = memory_mib or built.memory_mib
    elif body.image is None:
        raise InvalidInput("give the disk image's path (image) or built_flavor")
    else:
        files = ImageFiles(disk=Path(body.image), cmdline=body.cmdline,
                           kernel=Path(body.kernel) if body.kernel else None,
                           initrd=Path(body.initrd) if body.initrd else None)
    customization = body.customization or (
        Customization.CLOUD_INIT if built is not None and built.flavor is Flavor.CLOUDINIT
        else Customization.FWCFG)
    version = TemplateService(svc.ctx).publish(
        name, files, customization=customization, vcpus=body.vcpus,
        memory_mib=memory_mib or 768, recipe_hash=recipe_hash, notes=body.notes,
        runs_on=body.runs_on, arch=body.arch or ("x86_64" if built is not None else ""),
        user_data=body.user_data, join_hook=body.join_hook)
    audit(svc.ctx, actor, "template.publish", f"template/{name}",
          f"published version {version.number} of template {name}",
          new={"number": version.number, "image": body.image or f"built:{body.built_flavor}",
               "sha256": version.image_sha256, "user_data": body.user_data is not None,
               "join_hook": body.join_hook is not None})
    return asdict(version)


@router.get("/pools", response_model=list[PoolAdminView])
def pools(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    return [asdict(p) for p in PoolService(svc.ctx).list()]


@router.post("/pools", response_model=PoolAdminView, responses=errors(404, 409))
def create_pool(body: PoolCreate, actor: AdminActor, svc: ServicesDep) -> Row:
    spec = PoolSpec(
        name=body.name, template=body.template, kind=body.kind, assignment=body.assignment,
        min_size=body.min_size, max_size=body.max_size, spare=body.spare,
        naming_pattern=body.naming_pattern, clone_mode=body.clone_mode.value,
        on_logout=body.on_logout, revert_by=body.revert_by, one_time=body.one_time,
        user_layer_mib=body.user_layer_mib,
        max_age_s=body.max_age_s,
        power_policy=body.power_policy, canary=body.canary,
        reservation_timeout_s=body.reservation_timeout_s, idle_timeout_s=body.idle_timeout_s,
        disconnect_timeout_s=body.disconnect_timeout_s, placement=body.placement,
        session_start_timeout_s=body.session_start_timeout_s,
        roaming_profiles=body.roaming_profiles, second_session=body.second_session,
        profile_exclusions=tuple(body.profile_exclusions),
        redirect_folders=tuple(body.redirect_folders), balance=body.balance,
        offline=OfflinePolicy(**body.offline.model_dump()))
    return asdict(PoolAdmin(svc.ctx, actor).create(spec, hosts=body.hosts))


@router.get("/entitlements", response_model=list[GrantView])
def entitlements(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    return [asdict(g) for g in svc.entitlements.list()]


@router.post("/pools/{pool}/entitlements", response_model=GrantView,
             responses=errors(404, 409))
def grant(pool: PoolPath, body: GrantRequest, actor: AdminActor, svc: ServicesDep) -> Row:
    return asdict(svc.entitlements.grant(pool, body.kind, body.principal, actor=actor))


@router.delete("/pools/{pool}/entitlements/{kind}/{principal}", status_code=204,
                responses=errors(404))
def revoke(pool: PoolPath, kind: PrincipalKind, principal: UserPath, actor: AdminActor,
           svc: ServicesDep) -> None:
    svc.entitlements.revoke(pool, kind, principal, actor=actor)


@router.get("/users", response_model=list[UserAdminView])
def users(admin: AdminUser, svc: ServicesDep) -> list[UserAdminView]:
    return [UserAdminView.model_validate(asdict(u)) for u in UserAdmin(svc.ctx).list()]


@router.post("/users", responses=errors(409))
def create_user(body: UserCreate, actor: AdminActor, svc: ServicesDep) -> Row:
    created = svc.accounts.create_user(body.name, body.password,
                                       display_name=body.display_name, is_admin=body.is_admin,
                                       groups=body.groups, actor=actor)
    return {"name": created.name, "is_admin": created.is_admin,
            "groups": sorted({g.strip().lower() for g in body.groups})}


@router.get("/desktops", response_model=list[DesktopAdminView])
def desktops(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    """Every desktop with its live state, power, user and, when stuck, the reason."""
    with svc.ctx.uow(read_only=True) as uow:
        rows = [(r.desktop, r.host, r.pool, r.version)
                for r in uow.desktop_listings.for_admin()]
        return [{"id": str(d.id), "name": d.name, "hostname": d.hostname, "state": d.state,
                 "power_state": d.power_state.value, "task": d.task, "host": host,
                 "pool": pool, "version": number, "user": d.assigned_user,
                 "last_error": d.last_error, "retry_count": d.retry_count,
                 "state_changed_at": d.state_changed_at.isoformat(),
                 "console_connections": d.console_connections,
                 "placement_reason": d.placement_reason, "notice": d.notice}
                for d, host, pool, number in rows]


@router.get("/sessions", response_model=list[SessionAdminView])
def sessions(admin: AdminUser, svc: ServicesDep) -> list[Row]:
    with svc.ctx.uow(read_only=True) as uow:
        rows = uow.desktop_listings.held()
        return [{"desktop_id": str(d.id), "desktop": d.name, "user": d.assigned_user,
                 "state": d.state, "reserved_at": _iso(d.reserved_at),
                 "console_connections": d.console_connections,
                 "disconnected_at": _iso(d.disconnected_at), "guest_user": d.guest_user}
                for d in rows]


@router.post("/desktops/{desktop_id}/logoff", response_model=StateResponse,
             responses=errors(404, 409, 502, 503))
def force_log_off(desktop_id: uuid.UUID, admin: AdminUser, actor: AdminActor,
                  svc: ServicesDep) -> StateResponse:
    state = svc.sessions.log_off(desktop_id, by=admin,
                                 reason=f"logged off by administrator {admin.name}")
    audit(svc.ctx, actor, "desktop.logoff", f"desktop/{desktop_id}",
          f"logged desktop {desktop_id} off", new={"state": state})
    return StateResponse(desktop_id=desktop_id, state=DesktopState(state))


@router.post("/desktops/{desktop_id}/migrate", response_model=MigrationView,
             responses=errors(404, 409, 422, 502, 503))
def migrate_desktop(desktop_id: uuid.UUID, body: MigrateRequest, admin: AdminUser,
                    actor: AdminActor, svc: ServicesDep) -> MigrationView:
    """Move a running desktop live to another host (its user keeps their session)."""
    moved = MigrationService(svc.ctx).migrate(
        str(desktop_id), target=body.target, reason=f"asked by administrator {admin.name}")
    audit(svc.ctx, actor, "desktop.migrate", f"desktop/{desktop_id}",
          f"moved desktop {moved.desktop} live from {moved.source} to {moved.target}",
          new={"host": moved.target})
    return MigrationView(desktop=moved.desktop, source=moved.source, target=moved.target,
                         **asdict(moved.stats))


@router.get("/events")
def events(admin: AdminUser, svc: ServicesDep,
           limit: Annotated[int, Query(ge=1, le=2000)] = 200) -> list[Row]:
    svc.broker.records.flush()
    return [{**asdict(e), "at": e.at.isoformat()}
            for e in recent_events(svc.ctx, limit=min(max(limit, 1), 2000))]


@router.get("/logons")
def logons(admin: AdminUser, svc: ServicesDep,
           limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> list[Row]:
    """Each logon's phases in milliseconds: queue, claim, power-on, ready, session,
    connect."""
    svc.broker.records.flush()
    with svc.ctx.uow(read_only=True) as uow:
        rows = uow.logons.recent(min(max(limit, 1), 5000))
        return [{"id": str(r.id), "user": r.user_name, "pool": r.pool_name,
                 "desktop": r.desktop_name, "requested_at": r.requested_at.isoformat(),
                 "outcome": r.outcome, "reconnect": r.reconnect, "message": r.message,
                 "queue_ms": r.queue_ms, "claim_ms": r.claim_ms,
                 "power_on_ms": r.power_on_ms, "ready_ms": r.ready_ms,
                 "session_ms": r.session_ms, "connect_ms": r.connect_ms}
                for r in rows]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
