"""The administrator's routes that change things beyond the first set-up: a pool's settings,
size, status, deletion and template versions; hosts removed; template versions published and
deleted; users and groups; and the audit log every one of these writes to."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from deskpool.api.deps import AdminActor, AdminUser, ServicesDep
from deskpool.api.schemas import (
    NO_NUL,
    AuditEntry,
    GroupAdminView,
    GroupCreate,
    GroupMemberAdd,
    HostPath,
    NewPassword,
    PoolAdminView,
    PoolPath,
    PoolResize,
    PoolUpdate,
    RolloutRequest,
    TemplatePath,
    UserAdminView,
    UserPath,
    VersionPath,
    errors,
)
from deskpool.broker.user_admin import UserAdmin
from deskpool.services.audit import audit_log
from deskpool.services.hosts import HostService
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.pools import PoolService, PoolView
from deskpool.services.templates import delete_version

router = APIRouter(prefix="/api/v1/admin", tags=["admin"],
                   responses=errors(400, 401, 403, 413, 422))
Row = dict[str, Any]
NOT_FOUND = errors(404)
REFUSED = errors(409)


def _pool(view: PoolView) -> PoolAdminView:
    return PoolAdminView.model_validate(asdict(view))


# --- pools -----------------------------------------------------------------------------------

@router.get("/pools/{name}", response_model=PoolAdminView, responses=NOT_FOUND)
def pool(name: PoolPath, admin: AdminUser, svc: ServicesDep) -> PoolAdminView:
    return _pool(PoolService(svc.ctx).get(name))


@router.patch("/pools/{name}", response_model=PoolAdminView, responses=NOT_FOUND | REFUSED)
def update_pool(name: PoolPath, body: PoolUpdate, actor: AdminActor,
                svc: ServicesDep) -> PoolAdminView:
    """Change any setting the pool was created with; the ones left out stay."""
    changes = body.model_dump(exclude_unset=True)
    return _pool(PoolAdmin(svc.ctx, actor).update(name, changes))


@router.post("/pools/{name}/resize", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def resize_pool(name: PoolPath, body: PoolResize, actor: AdminActor,
                svc: ServicesDep) -> PoolAdminView:
    return _pool(PoolAdmin(svc.ctx, actor).resize(
        name, min_size=body.min_size, max_size=body.max_size, spare=body.spare))


@router.post("/pools/{name}/disable", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def disable_pool(name: PoolPath, actor: AdminActor, svc: ServicesDep) -> PoolAdminView:
    """No new sessions; users keep (and reconnect to) the desktops they hold."""
    return _pool(PoolAdmin(svc.ctx, actor).set_enabled(name, False))


@router.post("/pools/{name}/enable", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def enable_pool(name: PoolPath, actor: AdminActor, svc: ServicesDep) -> PoolAdminView:
    return _pool(PoolAdmin(svc.ctx, actor).set_enabled(name, True))


@router.post("/pools/{name}/clear-fault", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def clear_pool_fault(name: PoolPath, actor: AdminActor, svc: ServicesDep) -> PoolAdminView:
    """The pool's template disk is fine again (restored by hand): its fault is cleared and
    the reconciler tries at once (marking it again if the disk is still missing or corrupt).
    Refused (409) when the pool has no fault."""
    return _pool(PoolAdmin(svc.ctx, actor).clear_fault(name))


@router.delete("/pools/{name}", response_model=PoolAdminView, status_code=202,
               responses=NOT_FOUND | REFUSED)
def delete_pool(name: PoolPath, actor: AdminActor, svc: ServicesDep) -> PoolAdminView:
    """Accepted: the pool is ``deleting``. Its free desktops are retired now, held ones as
    their users log off; the pool goes when none is left."""
    return _pool(PoolAdmin(svc.ctx, actor).delete(name))


@router.post("/pools/{name}/rollout", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def rollout_pool(name: PoolPath, body: RolloutRequest, actor: AdminActor,
                 svc: ServicesDep) -> PoolAdminView:
    """New desktops from ``version`` (default: latest); free old ones are replaced once
    ``canary`` new ones are ready, held ones as their users leave. Progress: the pool's
    desktops by version (``GET /desktops``) and its counts."""
    return _pool(PoolAdmin(svc.ctx, actor).rollout(name, body.version, body.canary))


@router.post("/pools/{name}/rollback", response_model=PoolAdminView,
             responses=NOT_FOUND | REFUSED)
def rollback_pool(name: PoolPath, actor: AdminActor, svc: ServicesDep) -> PoolAdminView:
    return _pool(PoolAdmin(svc.ctx, actor).rollback(name))


# --- hosts and templates ---------------------------------------------------------------------

@router.delete("/hosts/{name}", status_code=204, responses=NOT_FOUND | REFUSED)
def remove_host(name: HostPath, actor: AdminActor, svc: ServicesDep) -> Response:
    """Forget an empty host; refused while desktops are on it or pools are pinned to it."""
    HostService(svc.ctx).remove(name, actor=actor)
    return Response(status_code=204)


@router.delete("/templates/{name}/versions/{number}", status_code=204,
               responses=NOT_FOUND | REFUSED)
def delete_template_version(name: TemplatePath, number: VersionPath, actor: AdminActor,
                            svc: ServicesDep) -> Response:
    """Delete an unused version; refused while desktops or pools use it."""
    delete_version(svc.ctx, name, number, actor=actor)
    return Response(status_code=204)


# --- users and groups ------------------------------------------------------------------------

@router.get("/users/{name}", response_model=UserAdminView, responses=NOT_FOUND)
def user(name: UserPath, admin: AdminUser, svc: ServicesDep) -> UserAdminView:
    return UserAdminView.model_validate(asdict(UserAdmin(svc.ctx).get(name)))


@router.post("/users/{name}/disable", response_model=UserAdminView,
             responses=NOT_FOUND | REFUSED)
def disable_user(name: UserPath, actor: AdminActor, svc: ServicesDep) -> UserAdminView:
    """Sign-in refused and every token of theirs revoked now."""
    return UserAdminView.model_validate(asdict(UserAdmin(svc.ctx, actor).set_disabled(name,
                                                                                     True)))


@router.post("/users/{name}/enable", response_model=UserAdminView, responses=NOT_FOUND)
def enable_user(name: UserPath, actor: AdminActor, svc: ServicesDep) -> UserAdminView:
    return UserAdminView.model_validate(asdict(UserAdmin(svc.ctx, actor).set_disabled(name,
                                                                                     False)))


@router.delete("/users/{name}", status_code=204, responses=NOT_FOUND | REFUSED)
def delete_user(name: UserPath, actor: AdminActor, svc: ServicesDep) -> Response:
    """Refused while they hold a desktop."""
    UserAdmin(svc.ctx, actor).delete(name)
    return Response(status_code=204)


@router.post("/users/{name}/password", response_model=NewPassword, responses=NOT_FOUND)
def reset_password(name: UserPath, actor: AdminActor, svc: ServicesDep) -> NewPassword:
    """A new random password, shown this once; their sessions and tokens are revoked."""
    password = UserAdmin(svc.ctx, actor).reset_password(name)
    return NewPassword(user=name.strip().lower(), password=password)


@router.get("/groups", response_model=list[GroupAdminView])
def groups(admin: AdminUser, svc: ServicesDep) -> list[GroupAdminView]:
    return [GroupAdminView.model_validate(asdict(g)) for g in UserAdmin(svc.ctx).groups()]


@router.post("/groups", response_model=GroupAdminView, status_code=201, responses=REFUSED)
def create_group(body: GroupCreate, actor: AdminActor, svc: ServicesDep) -> GroupAdminView:
    return GroupAdminView.model_validate(asdict(UserAdmin(svc.ctx, actor).create_group(
        body.name)))


@router.delete("/groups/{name}", status_code=204, responses=NOT_FOUND)
def delete_group(name: UserPath, actor: AdminActor, svc: ServicesDep) -> Response:
    UserAdmin(svc.ctx, actor).delete_group(name)
    return Response(status_code=204)


@router.post("/groups/{name}/members", status_code=204, responses=NOT_FOUND)
def add_member(name: UserPath, body: GroupMemberAdd, actor: AdminActor,
               svc: ServicesDep) -> Response:
    svc.accounts.add_to_group(body.user, name, actor=actor)
    return Response(status_code=204)


@router.delete("/groups/{name}/members/{user_name}", status_code=204, responses=NOT_FOUND)
def remove_member(name: UserPath, user_name: UserPath, actor: AdminActor,
                  svc: ServicesDep) -> Response:
    UserAdmin(svc.ctx, actor).remove_member(name, user_name)
    return Response(status_code=204)


# --- the audit log ---------------------------------------------------------------------------

@router.get("/audit", response_model=list[AuditEntry])
def audit_entries(
    admin: AdminUser, svc: ServicesDep,
    actor: Annotated[str | None, Query(max_length=255, pattern=NO_NUL,
                                       description="who did it")] = None,
    target: Annotated[str | None, Query(max_length=255, pattern=NO_NUL, description=(
        "what it was done to, e.g. pool/lab; 'pool' finds every pool"))] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[AuditEntry]:
    """Every administrator's action, newest first: who, from where, when, to what, and the
    values before and after."""
    return [AuditEntry.model_validate(asdict(e))
            for e in audit_log(svc.ctx, limit=limit, actor=actor, target=target)]
