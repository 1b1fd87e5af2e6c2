"""Request and response bodies of the REST API (what OpenAPI documents)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field


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


class UserCreate(BaseModel):
    name: str
    password: str
    display_name: str = ""
    is_admin: bool = False
    groups: list[str] = Field(default_factory=list)


class GrantRequest(BaseModel):
    kind: str  # user | group
    principal: str


class PoolCreate(BaseModel):
    name: str
    template: str
    kind: str = "stateless"
    assignment: str = "floating"
    min_size: int = 0
    max_size: int = 10
    spare: int = 1
    naming_pattern: str = "desktop-{n:03}"
    clone_mode: str = "linked"
    on_logout: str = "recycle-revert"
    power_policy: str = "running"
    reservation_timeout_s: int = 300
    idle_timeout_s: int | None = None
    disconnect_timeout_s: int | None = 1800
    placement: str = "spread"
    hosts: list[str] = Field(default_factory=list)


class TemplatePublish(BaseModel):
    """A new version of a template from files on the broker's machine: a disk image (with a
    kernel and initrd for direct boot), or an image ``deskpool image build`` made
    (``built_flavor``). ``user_data`` and ``join_hook`` are the texts themselves."""

    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    built_flavor: str | None = None
    customization: str | None = None  # default: cloud-init for the cloudinit flavor, else fwcfg
    vcpus: int = Field(default=1, ge=1, le=256)
    memory_mib: int | None = Field(default=None, ge=128)
    notes: str = ""
    user_data: str | None = Field(default=None, max_length=256 * 1024)
    join_hook: str | None = Field(default=None, max_length=64 * 1024)


class HostCreate(BaseModel):
    name: str
    uri: str
    cpu_overcommit: float = 4.0
    memory_overcommit: float = 1.0
    max_desktops: int | None = None
    max_provisioning: int = 2
    transfer_slots: int = 2


class DrainRequest(BaseModel):
    grace_s: int = Field(default=1800, ge=0, le=7 * 86400)
