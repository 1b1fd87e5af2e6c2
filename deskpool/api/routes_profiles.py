"""Roaming profiles: the signed-in user's own view, and the administrator's list, view,
reset and rollback (audited), and checksum verification."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deskpool.api.deps import AdminActor, AdminUser, CurrentUser, ServicesDep
from deskpool.api.schemas import NUMBER, UserPath, errors
from deskpool.services.profile_admin import ProfileAdmin
from deskpool.services.profiles import ProfileView

router = APIRouter(prefix="/api/v1", responses=errors(400, 401, 403, 413, 422))
NOT_FOUND = errors(404)
REFUSED = errors(409)


class ProfilePublic(BaseModel):
    """A roaming profile: its committed generation, size, the last write-back, what was set
    aside and what merges found changed on two desktops."""

    user: str
    generation: int
    size_bytes: int
    quota_bytes: int
    rollback_to: list[int]
    open_sessions: list[str]
    unclean: list[tuple[str, str]]  # (desktop, why)
    generations_kept: int
    committed_at: datetime | None
    last_writeback_bytes: int
    last_writeback_s: float | None
    conflicts: list[str]


class RollbackRequest(BaseModel):
    generation: Annotated[int, Field(ge=1, le=2**31 - 1, description="a kept generation"),
                          NUMBER]


class VerifyReport(BaseModel):
    """Every committed layer read against its recorded sha256: ``problems`` names each
    layer that differs or cannot be read (empty: all match)."""

    user: str
    problems: list[str]


def _public(view: ProfileView) -> ProfilePublic:
    return ProfilePublic.model_validate(asdict(view))


@router.get("/profile", response_model=ProfilePublic, tags=["user"], responses=NOT_FOUND)
def my_profile(user: CurrentUser, svc: ServicesDep) -> ProfilePublic:
    """The caller's own roaming profile."""
    return _public(ProfileAdmin(svc.ctx).show(user.name))


@router.get("/admin/profiles", response_model=list[ProfilePublic], tags=["admin"])
def list_profiles(admin: AdminUser, svc: ServicesDep) -> list[ProfilePublic]:
    return [_public(view) for view in ProfileAdmin(svc.ctx).list()]


@router.get("/admin/profiles/{name}", response_model=ProfilePublic, tags=["admin"],
            responses=NOT_FOUND)
def show_profile(name: UserPath, admin: AdminUser, svc: ServicesDep) -> ProfilePublic:
    return _public(ProfileAdmin(svc.ctx).show(name))


@router.post("/admin/profiles/{name}/reset", response_model=ProfilePublic, tags=["admin"],
             responses=NOT_FOUND | REFUSED)
def reset_profile(name: UserPath, actor: AdminActor, svc: ServicesDep) -> ProfilePublic:
    """A fresh home from the user's next logon; the old one stays a generation."""
    return _public(ProfileAdmin(svc.ctx, actor).reset(name))


@router.post("/admin/profiles/{name}/rollback", response_model=ProfilePublic,
             tags=["admin"], responses=NOT_FOUND | REFUSED)
def rollback_profile(name: UserPath, body: RollbackRequest, actor: AdminActor,
                     svc: ServicesDep) -> ProfilePublic:
    """The kept generation becomes the next one; the ones between stay kept."""
    return _public(ProfileAdmin(svc.ctx, actor).rollback(name, body.generation))


@router.post("/admin/profiles/{name}/verify", response_model=VerifyReport, tags=["admin"],
             responses=NOT_FOUND)
def verify_profile(name: UserPath, admin: AdminUser, svc: ServicesDep) -> VerifyReport:
    """Read the user's committed layers against their checksums (each mismatch is also an
    error event); the profile itself is not changed."""
    return VerifyReport(user=name, problems=ProfileAdmin(svc.ctx).verify(name))
