"""User layers (issue 14): a desktop's layer and its last rebase, a pool's rollout in numbers
(administrators), and a user's own desktop's conflicts of its last rebase."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deskpool.api.deps import AdminActor, AdminUser, CurrentUser, ServicesDep
from deskpool.api.schemas import PoolPath, StateResponse, errors
from deskpool.domain.states import DesktopState
from deskpool.services.audit import audit
from deskpool.services.layer_rebase_boot import request_rebase
from deskpool.services.user_layers import DesktopLayerView, PoolLayersView, UserLayerViews

router = APIRouter(prefix="/api/v1", responses=errors(400, 401, 413, 422))
NOT_FOUND = errors(404)


class LayerItem(BaseModel):
    """A conflict of a rebase (the new base's version won; ``user_copy`` is where the user's
    went, null when they had deleted the file) or a note (the user's version won)."""

    path: str
    reason: str
    user_copy: str | None = None


class LayerRebaseSummary(BaseModel):
    """One rebase of a user layer onto a template version, and what it did."""

    old_version: int
    new_version: int
    finished_at: datetime
    outcome: str = Field(description="rebased, or failed (``error`` says why; the layer was "
                                     "left as it was)")
    error: str | None
    kept: int
    dropped: int
    conflict_count: int
    note_count: int
    excluded: int
    layer_bytes: int
    conflicts: list[LayerItem]
    notes: list[LayerItem]


class DesktopLayer(BaseModel):
    """A desktop's user layer as last reported, and its last rebase (null: none yet)."""

    desktop_id: uuid.UUID
    desktop: str
    pool: str | None
    user: str | None
    template_version: int = Field(description="the template version the desktop runs")
    layer_version: int | None = Field(description="the version the layer sits on "
                                                  "(null: not reported yet)")
    layer_bytes: int | None
    changed_files: int | None
    checked_at: datetime | None
    last_rebase: LayerRebaseSummary | None


class LayerVersionCount(BaseModel):
    version: int
    desktops: int
    current: bool = Field(description="the pool's current version: the rollout's target")


class LayerRolloutConflict(BaseModel):
    desktop: str
    path: str
    reason: str
    user_copy: str | None


class LayerRolloutFailure(BaseModel):
    desktop: str
    error: str


class PoolLayers(BaseModel):
    """A pool's desktops per template version, and what the rebases onto its current version
    produced (each desktop's newest rebase counted once)."""

    pool: str
    user_layer_mib: int
    current_version: int
    versions: list[LayerVersionCount]
    rebased: int
    failed: int
    conflicts: int
    notes: int
    conflict_list: list[LayerRolloutConflict] = Field(description="at most 500, by desktop")
    failures: list[LayerRolloutFailure]
    awaiting_rebase: int = Field(
        0, description="desktops on another version: their layers are rebased at their "
                       "users' logoff, or by the reconciler while free and ready")


class MyLayerConflicts(BaseModel):
    """The conflicts and notes of the last rebase of the caller's desktop's user layer."""

    desktop_id: uuid.UUID
    desktop: str
    old_version: int | None = Field(description="null: the layer was never rebased")
    new_version: int | None
    finished_at: datetime | None
    outcome: str | None
    conflicts: list[LayerItem]
    notes: list[LayerItem]


def desktop_layer_public(view: DesktopLayerView) -> DesktopLayer:
    return DesktopLayer.model_validate(asdict(view))


def pool_layers_public(view: PoolLayersView) -> PoolLayers:
    return PoolLayers.model_validate(asdict(view))


@router.get("/admin/desktops/{desktop_id}/layer", response_model=DesktopLayer,
            tags=["admin"], responses=NOT_FOUND)
def desktop_layer(desktop_id: uuid.UUID, admin: AdminUser, svc: ServicesDep) -> DesktopLayer:
    """The desktop's user layer: size, changed files, the version it sits on, and its last
    rebase with its conflicts and notes."""
    return desktop_layer_public(UserLayerViews(svc.ctx).desktop_layer(desktop_id))


@router.get("/admin/pools/{name}/layers", response_model=PoolLayers, tags=["admin"],
            responses=NOT_FOUND)
def pool_layers(name: PoolPath, admin: AdminUser, svc: ServicesDep) -> PoolLayers:
    """How many of the pool's desktops run each template version, and the conflicts and
    failures of the rebases onto its current version."""
    return pool_layers_public(UserLayerViews(svc.ctx).pool_layers(name))


@router.post("/admin/desktops/{desktop_id}/rebase", response_model=StateResponse,
             status_code=202, tags=["admin"], responses=errors(404, 409))
def rebase_desktop(desktop_id: uuid.UUID, admin: AdminUser, actor: AdminActor,
                   svc: ServicesDep) -> StateResponse:
    """Rebase a ready desktop's user layer onto its pool's current version now: it is
    recycling until the reconciler has booted it on that version (or, failing, on its own
    again). 409 when it is in use (its layer is rebased at its user's logoff), busy, already
    on its pool's version, or has no user layer."""
    found, name = request_rebase(svc.ctx, desktop_id)
    audit(svc.ctx, actor, "desktop.rebase", f"desktop/{found}",
          f"asked for a rebase of desktop {name}'s user layer",
          new={"state": DesktopState.RECYCLING.value})
    return StateResponse(desktop_id=found, state=DesktopState.RECYCLING)


@router.get("/desktops/{desktop_id}/layer-conflicts", response_model=MyLayerConflicts,
            tags=["user"], responses=errors(403))
def my_layer_conflicts(desktop_id: uuid.UUID, user: CurrentUser,
                       svc: ServicesDep) -> MyLayerConflicts:
    """What the last rebase of your desktop's user layer could not keep as you had it: your
    copy of each such file is kept beside it (``user_copy``). 403 for a desktop that is not
    yours as for none."""
    view = UserLayerViews(svc.ctx).user_conflicts(user.name, desktop_id)
    last = view.last_rebase
    return MyLayerConflicts.model_validate({
        "desktop_id": view.desktop_id, "desktop": view.desktop,
        "old_version": last.old_version if last else None,
        "new_version": last.new_version if last else None,
        "finished_at": last.finished_at if last else None,
        "outcome": last.outcome if last else None,
        "conflicts": [asdict(c) for c in last.conflicts] if last else [],
        "notes": [asdict(n) for n in last.notes] if last else []})
