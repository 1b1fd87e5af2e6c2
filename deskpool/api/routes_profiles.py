"""Roaming profiles: the signed-in user's own view, and the administrator's list, view,
reset and rollback (audited), checksum verification, which hosts hold each generation and
the copies of layers between hosts in flight."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deskpool.api.deps import AdminActor, AdminUser, CurrentUser, ServicesDep
from deskpool.api.schemas import NUMBER, UserPath, errors
from deskpool.services.profile_admin import LayerCopyView, ProfileAdmin
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
    latest_on: list[str] = Field(default_factory=list, description=(
        "hosts whose storage holds the latest generation (empty: only the profile store "
        "every host reaches); placement prefers them"))


class GenerationHosts(BaseModel):
    generation: int
    hosts: list[str] = Field(description="empty: only in the profile store every host reaches")


class ProfileHosts(BaseModel):
    """Which hosts hold each committed generation of a user's profile, oldest first."""

    user: str
    generations: list[GenerationHosts]


class LayerCopyPublic(BaseModel):
    """A profile layer being copied to a host for a logon there, with its progress."""

    user: str
    generation: int
    layer_id: str
    host: str
    bytes_done: int
    bytes_total: int
    copier: str | None
    updated_at: datetime | None


class RollbackRequest(BaseModel):
    generation: Annotated[int, Field(ge=1, le=2**31 - 1, description="a kept generation"),
                          NUMBER]


class VerifyReport(BaseModel):
    """Every committed layer read against its recorded sha256: ``problems`` names each
    layer that differs or cannot be read (empty: all match)."""

    user: str
    problems: list[str]


def _public(view: ProfileView, latest_on: list[str] | None = None) -> ProfilePublic:
    return ProfilePublic.model_validate(asdict(view) | {"latest_on": latest_on or []})


@router.get("/profile", response_model=ProfilePublic, tags=["user"], responses=NOT_FOUND)
def my_profile(user: CurrentUser, svc: ServicesDep) -> ProfilePublic:
    """The caller's own roaming profile."""
    return _public(ProfileAdmin(svc.ctx).show(user.name))


@router.get("/admin/profiles", response_model=list[ProfilePublic], tags=["admin"])
def list_profiles(admin: AdminUser, svc: ServicesDep) -> list[ProfilePublic]:
    profiles = ProfileAdmin(svc.ctx)
    on = profiles.latest_on()
    return [_public(view, on.get(view.user)) for view in profiles.list()]


@router.get("/admin/profile-copies", response_model=list[LayerCopyPublic], tags=["admin"])
def profile_copies(admin: AdminUser, svc: ServicesDep) -> list[LayerCopyPublic]:
    """Profile layers being copied between hosts now, oldest first (empty: none)."""
    return [_copy(c) for c in ProfileAdmin(svc.ctx).copies()]


def _copy(c: LayerCopyView) -> LayerCopyPublic:
    return LayerCopyPublic(user=c.user, generation=c.generation, layer_id=str(c.layer_id),
                           host=c.host, bytes_done=c.bytes_done, bytes_total=c.bytes_total,
                           copier=c.copier, updated_at=c.updated_at)


@router.get("/admin/profiles/{name}", response_model=ProfilePublic, tags=["admin"],
            responses=NOT_FOUND)
def show_profile(name: UserPath, admin: AdminUser, svc: ServicesDep) -> ProfilePublic:
    profiles = ProfileAdmin(svc.ctx)
    view = profiles.show(name)
    return _public(view, profiles.latest_on(name).get(name))


@router.get("/admin/profiles/{name}/hosts", response_model=ProfileHosts, tags=["admin"],
            responses=NOT_FOUND)
def profile_hosts(name: UserPath, admin: AdminUser, svc: ServicesDep) -> ProfileHosts:
    held = ProfileAdmin(svc.ctx).held_on(name)
    return ProfileHosts(user=name, generations=[GenerationHosts(generation=g, hosts=h)
                                                for g, h in held.items()])


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
