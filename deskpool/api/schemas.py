"""Request and response bodies of the REST API (what OpenAPI documents)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deskpool.domain.models import CloneMode, Customization, PoolStatus
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PowerPolicy
from deskpool.images.recipe import Flavor


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=1024)


class UserPublic(BaseModel):
    name: str
    display_name: str
    source: str
    groups: list[str]
    is_admin: bool


class LoginResponse(BaseModel):
    token: str
    expires_at: datetime | None
    user: UserPublic


class TokenRequest(BaseModel):
    label: str = Field(default="", max_length=255)


class PoolEntry(BaseModel):
    name: str
    template: str
    kind: str
    assignment: str
    ready: int
    mine: str | None = None  # the name of the desktop I hold in it


class HandoverResponse(BaseModel):
    status: str  # ready | pending
    pool: str
    message: str
    logon_id: uuid.UUID
    desktop_id: uuid.UUID | None
    desktop: str | None
    hostname: str | None
    reconnect: bool
    phases_ms: dict[str, int]


class MyDesktop(BaseModel):
    id: uuid.UUID
    name: str
    hostname: str
    pool: str
    state: str
    connected: bool
    notice: str | None = None  # e.g. a host maintenance warning


class ConsoleTicketResponse(BaseModel):
    token: str
    desktop: str
    expires_at: datetime
    websocket_port: int | None


class StateResponse(BaseModel):
    desktop_id: uuid.UUID
    state: str


# --- admin ------------------------------------------------------------------------------------

Seconds = Annotated[int, Field(gt=0, le=10 * 365 * 86400)]
Size = Annotated[int, Field(ge=0, le=100_000)]
PrincipalKind = Literal["user", "group"]
Placement = Literal["spread", "pack"]


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=8, max_length=1024)
    display_name: str = Field(default="", max_length=255)
    is_admin: bool = False
    groups: list[str] = Field(default_factory=list, max_length=100)


class UserAdminView(BaseModel):
    name: str
    display_name: str
    source: str
    groups: list[str]
    is_admin: bool
    disabled: bool
    last_login_at: datetime | None


class NewPassword(BaseModel):
    user: str
    password: str  # shown once: only its hash is kept


class GroupCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255)


class GroupMemberAdd(BaseModel):
    user: str = Field(min_length=1, max_length=255)


class GroupAdminView(BaseModel):
    name: str
    members: list[str]


class GrantRequest(BaseModel):
    kind: PrincipalKind
    principal: str = Field(min_length=1, max_length=255)


class PoolCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    template: str = Field(min_length=1, max_length=255)
    kind: PoolKind = PoolKind.STATELESS
    assignment: Assignment = Assignment.FLOATING
    min_size: Size = 0
    max_size: Size = 10
    spare: Size = 1
    naming_pattern: str = Field(default="desktop-{n:03}", max_length=255)
    clone_mode: CloneMode = CloneMode.LINKED
    on_logout: OnLogout = OnLogout.RECYCLE_REVERT
    one_time: bool = False
    max_age_s: Seconds | None = None
    power_policy: PowerPolicy = PowerPolicy.RUNNING
    canary: Size = 0
    reservation_timeout_s: Seconds = 300
    idle_timeout_s: Seconds | None = None
    disconnect_timeout_s: Seconds | None = 1800
    session_start_timeout_s: Seconds = 150
    roaming_profiles: bool = False
    placement: Placement = "spread"
    hosts: list[str] = Field(default_factory=list, max_length=100)


class PoolUpdate(BaseModel):
    """The settings to change; the ones left out stay. ``kind``, ``assignment`` and
    ``template`` change only while the pool has no desktops; ``hosts`` replaces the pins
    ([] for any host)."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(default=None, min_length=1, max_length=255)
    kind: PoolKind | None = None
    assignment: Assignment | None = None
    min_size: Size | None = None
    max_size: Size | None = None
    spare: Size | None = None
    naming_pattern: str | None = Field(default=None, max_length=255)
    clone_mode: CloneMode | None = None
    on_logout: OnLogout | None = None
    one_time: bool | None = None
    max_age_s: Seconds | None = None
    power_policy: PowerPolicy | None = None
    canary: Size | None = None
    reservation_timeout_s: Seconds | None = None
    idle_timeout_s: Seconds | None = None
    disconnect_timeout_s: Seconds | None = None
    session_start_timeout_s: Seconds | None = None
    roaming_profiles: bool | None = None
    placement: Placement | None = None
    hosts: list[str] | None = Field(default=None, max_length=100)


# Settings that may be cleared (null: never) rather than left as they are.
NULLABLE_POOL_SETTINGS = frozenset({"max_age_s", "idle_timeout_s", "disconnect_timeout_s"})


class PoolResize(BaseModel):
    min_size: Size | None = None
    max_size: Size | None = None
    spare: Size | None = None


class RolloutRequest(BaseModel):
    version: int | None = Field(default=None, ge=1, le=1_000_000,
                                description="default: the template's latest")
    canary: Size | None = Field(default=None, description="new-version desktops ready "
                                "before free old ones are replaced; default: as set")


class PoolAdminView(BaseModel):
    id: uuid.UUID
    name: str
    template: str
    version: int
    previous_version: int | None
    kind: PoolKind
    assignment: Assignment
    clone_mode: CloneMode
    min_size: int
    max_size: int
    spare: int
    counts: dict[str, int]
    status: PoolStatus
    session_start_timeout_s: int
    roaming_profiles: bool = False


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str | None
    address: str | None
    action: str
    target: str | None
    message: str
    old: Any
    new: Any


class TemplatePublish(BaseModel):
    """A new version of a template from files on the broker's machine: a disk image (with a
    kernel and initrd for direct boot), or an image ``deskpool image build`` made
    (``built_flavor``). ``user_data`` and ``join_hook`` are the texts themselves."""

    image: str | None = Field(default=None, min_length=1, max_length=4096)
    kernel: str | None = Field(default=None, max_length=4096)
    initrd: str | None = Field(default=None, max_length=4096)
    cmdline: str | None = Field(default=None, max_length=4096)
    built_flavor: Flavor | None = None
    # Default: cloud-init for the cloudinit flavor, else fw_cfg.
    customization: Customization | None = None
    vcpus: int = Field(default=1, ge=1, le=256)
    memory_mib: int | None = Field(default=None, ge=128, le=4 * 1024 * 1024)
    notes: str = Field(default="", max_length=4096)
    runs_on: str = Field(default="", max_length=128)
    arch: str = Field(default="", max_length=32)
    user_data: str | None = Field(default=None, max_length=256 * 1024)
    join_hook: str | None = Field(default=None, max_length=64 * 1024)


class HostCreate(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    uri: str = Field(min_length=1, max_length=1024)
    cpu_overcommit: float = Field(default=4.0, gt=0, le=1000, allow_inf_nan=False)
    memory_overcommit: float = Field(default=1.0, gt=0, le=1000, allow_inf_nan=False)
    max_desktops: int | None = Field(default=None, ge=0, le=100_000)
    max_provisioning: int = Field(default=2, ge=1, le=1000)
    transfer_slots: int = Field(default=2, ge=1, le=1000)


class DrainRequest(BaseModel):
    grace_s: int = Field(default=1800, ge=0, le=7 * 86400)
