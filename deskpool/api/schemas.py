"""Request and response bodies of the REST API (what OpenAPI documents)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Path
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from deskpool.domain.models import (
    CloneMode,
    Customization,
    DomainType,
    HostState,
    PoolStatus,
    PowerState,
)
from deskpool.domain.offline import MAX_DAYS_OFFLINE_LIMIT
from deskpool.domain.pools import (
    USER_LAYER_MAX_MIB,
    Assignment,
    OnLogout,
    PoolKind,
    PowerPolicy,
    RevertBy,
)
from deskpool.domain.profile_merge import SecondSession
from deskpool.domain.states import DesktopState, DesktopTask
from deskpool.images.recipe import Flavor


class ErrorBody(BaseModel):
    """What every refusal and failure answers (``deskpool.api.app``'s handlers): one
    sentence saying what was wrong, and for bad input which field."""

    detail: str


Responses = dict[int | str, dict[str, Any]]
_MEANING = {
    400: "refused: the input does not make sense as a whole (``detail`` says why)",
    401: "no session cookie or bearer token, or one that is no longer valid",
    403: "signed in, but not allowed to do this",
    404: "no such pool, host, template, version, user, group or desktop",
    409: "refused in the current state (``detail`` says why)",
    413: "the request body is larger than 1 MiB",
    422: "bad input: ``detail`` names each field and what is wrong with it",
    429: "too many failed sign-ins: try again after ``Retry-After`` seconds",
    502: "the hypervisor or the guest failed at it",
    503: "not now (a full pool, a host that does not answer): try again",
}


def errors(*codes: int) -> Responses:
    """OpenAPI ``responses`` for the error statuses a route answers, with their real body."""
    return {code: {"model": ErrorBody, "description": _MEANING[code]} for code in codes}


# Free text: no NUL (PostgreSQL refuses it in text columns and queries).
NO_NUL = r"^[^\x00]*$"


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    password: str = Field(min_length=1, max_length=1024, pattern=NO_NUL)


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


class PoolEntry(BaseModel):
    name: str
    template: str
    kind: PoolKind
    assignment: Assignment
    ready: int
    mine: str | None = None  # the name of the desktop I hold in it


class HandoverResponse(BaseModel):
    status: Literal["ready", "pending"]
    pool: str
    message: str
    logon_id: uuid.UUID
    desktop_id: uuid.UUID | None
    desktop: str | None
    hostname: str | None
    reconnect: bool
    phases_ms: dict[str, int]


Severity = Literal["info", "warning", "error"]


class MyDesktop(BaseModel):
    id: uuid.UUID
    name: str
    hostname: str
    pool: str
    state: DesktopState
    connected: bool
    notice: str | None = None  # e.g. a host maintenance warning


class UserMessage(BaseModel):
    """Something that happened to one of the user's desktops (e.g. its VM crashed)."""

    at: datetime
    severity: Severity
    desktop: str | None
    message: str


class ConsoleTicketResponse(BaseModel):
    token: str
    desktop: str
    expires_at: datetime
    websocket_port: int | None


class StateResponse(BaseModel):
    desktop_id: uuid.UUID
    state: DesktopState


# --- admin ------------------------------------------------------------------------------------

# Every bound is checked here, at the edge, so that a value the database column, a Python
# datetime or a background loop cannot hold is a 422 naming the field, never a 500 later.

def _json_number(value: Any) -> Any:
    """A number must be a JSON number: pydantic's lax mode reads true as 1 and "5" as 5, so a
    body the schema calls invalid would be obeyed. (An integral 5.0 is an integer, as JSON
    Schema says; pydantic's strict mode would refuse it.)"""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number, not "
                         + ("true or false" if isinstance(value, bool) else "a string"))
    return value


def _json_flag(value: Any) -> Any:
    if not isinstance(value, bool):  # lax mode reads 1, "yes", "on" as true
        raise ValueError("must be true or false")
    return value


# Placed after a type's bounds (``Annotated[int, Field(le=...), NUMBER]``), so that pydantic
# keeps the bounds in the JSON schema as minimum and maximum.
NUMBER = BeforeValidator(_json_number)
Flag = Annotated[bool, BeforeValidator(_json_flag)]
Seconds = Annotated[int, Field(gt=0, le=10 * 365 * 86400), NUMBER]  # int32 and datetimes
Size = Annotated[int, Field(ge=0, le=100_000), NUMBER]
Days = Annotated[int, Field(ge=1, le=MAX_DAYS_OFFLINE_LIMIT), NUMBER]
# 0 (none) or USER_LAYER_MIN_MIB..MAX: PoolSpec.validate names the gap between.
LayerMib = Annotated[int, Field(ge=0, le=USER_LAYER_MAX_MIB), NUMBER]


class OfflinePolicyBody(BaseModel):
    """A pool's offline policy (``domain.offline.OfflinePolicy``); every field is enforced
    on the laptop. ``sync_every_days`` is at most ``max_days_offline``."""

    model_config = ConfigDict(extra="forbid")

    may_go_offline: Flag = False
    max_days_offline: Days = 14
    sync_every_days: Days = 7
    may_roll_back: Flag = False
    usb_passthrough: Flag = False
    printing: Flag = False
    offline_sso: Flag = False


class OfflinePolicyChange(BaseModel):
    """The offline policy fields to change; the ones left out stay."""

    model_config = ConfigDict(extra="forbid")

    may_go_offline: Flag | None = None
    max_days_offline: Days | None = None
    sync_every_days: Days | None = None
    may_roll_back: Flag | None = None
    usb_passthrough: Flag | None = None
    printing: Flag | None = None
    offline_sso: Flag | None = None


PrincipalKind = Literal["user", "group"]
Placement = Literal["spread", "pack"]
# The alphabets the services check (hosts, pools: services.hosts; templates: hostnames;
# users and groups: broker.accounts, which also lowercases).
HOST_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
POOL_NAME = HOST_NAME
TEMPLATE_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
USER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,254}$"
HostName = Annotated[str, Field(pattern=HOST_NAME, max_length=63)]
HostSetName = Annotated[str, Field(pattern=HOST_NAME, max_length=63)]  # services.hosts too
PoolName = Annotated[str, Field(pattern=POOL_NAME, max_length=63)]
# A path inside the home, kept out of roaming profiles (checked further by the pool).
ExclusionPath = Annotated[str, Field(min_length=1, max_length=255,
                                     pattern=r"^[^\x00-\x1f\x7f/][^\x00-\x1f\x7f]*$")]
# One folder directly in the home (deskpool.domain.redirection says the rest).
RedirectFolder = Annotated[str, Field(min_length=1, max_length=64,
                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}$")]
TemplateName = Annotated[str, Field(pattern=TEMPLATE_NAME, max_length=63)]
UserName = Annotated[str, Field(pattern=USER_NAME, max_length=255)]
# Path parameters, checked as strictly as the same names in bodies.
HostPath = Annotated[str, Path(pattern=HOST_NAME, max_length=63)]
PoolPath = Annotated[str, Path(pattern=POOL_NAME, max_length=63)]
HostSetPath = Annotated[str, Path(pattern=HOST_NAME, max_length=63)]
TemplatePath = Annotated[str, Path(pattern=TEMPLATE_NAME, max_length=63)]
UserPath = Annotated[str, Path(pattern=USER_NAME, max_length=255)]
VersionPath = Annotated[int, Path(ge=1, le=1_000_000)]
# A hypervisor URI: a scheme deskpool drives, "://", an optional user, host (a name or an IPv4
# address) and port, then a path and query of printable ASCII (a URI has no other characters;
# spelled out rather than as "not \s", which Python's and pydantic's regex engines and the
# schema's readers do not agree on); never empty (no default host).
_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
HYPERVISOR_URI = (r"^(qemu(\+(ssh|tcp|tls|unix|libssh|libssh2))?|fake(\+tcp)?)://"
                  r"([A-Za-z0-9._~%!$&'()*+,;=-]+@)?[A-Za-z0-9._~%-]*(:" + _PORT + r")?"
                  r"(/[\x21\x22\x24-\x3e\x40-\x7e]*)?(\?[\x21\x22\x24-\x7e]*)?$")


class UserCreate(BaseModel):
    name: UserName
    password: str = Field(min_length=8, max_length=1024, pattern=NO_NUL)
    display_name: str = Field(default="", max_length=255, pattern=NO_NUL)
    is_admin: Flag = False
    groups: list[UserName] = Field(default_factory=list, max_length=100)


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
    name: UserName


class GroupMemberAdd(BaseModel):
    user: UserName


class GroupAdminView(BaseModel):
    name: str
    members: list[str]


class GrantRequest(BaseModel):
    kind: PrincipalKind
    principal: UserName


class PoolCreate(BaseModel):
    name: PoolName
    template: TemplateName
    kind: PoolKind = PoolKind.STATELESS
    assignment: Assignment = Assignment.FLOATING
    min_size: Size = 0
    max_size: Size = 10
    spare: Size = 1
    naming_pattern: str = Field(default="desktop-{n:03}", max_length=255)
    clone_mode: CloneMode = CloneMode.LINKED
    on_logout: OnLogout = OnLogout.RECYCLE_REVERT
    revert_by: RevertBy = RevertBy.SNAPSHOT
    user_layer_mib: LayerMib = 0
    one_time: Flag = False
    max_age_s: Seconds | None = None
    power_policy: PowerPolicy = PowerPolicy.RUNNING
    canary: Size = 0
    reservation_timeout_s: Seconds = 300
    idle_timeout_s: Seconds | None = None
    disconnect_timeout_s: Seconds | None = 1800
    session_start_timeout_s: Seconds = 150
    roaming_profiles: Flag = False
    second_session: SecondSession = SecondSession.MERGE
    profile_exclusions: list[ExclusionPath] = Field(default_factory=list, max_length=32)
    redirect_folders: list[RedirectFolder] = Field(
        default_factory=list, max_length=16,
        description="folders of the home put on the user's file share (e.g. Documents)")
    placement: Placement = "spread"
    balance: Flag = Field(default=False, description="the load balancer may move its "
                          "running desktops live off a host under memory or CPU pressure")
    hosts: list[HostName] = Field(default_factory=list, max_length=100)
    offline: OfflinePolicyBody = Field(default_factory=OfflinePolicyBody)


# Settings that may be cleared (null: never) rather than left as they are.
NULLABLE_POOL_SETTINGS = frozenset({"max_age_s", "idle_timeout_s", "disconnect_timeout_s"})


class PoolUpdate(BaseModel):
    """The settings to change; the ones left out stay. ``kind``, ``assignment`` and
    ``template`` change only while the pool has no desktops; ``hosts`` replaces the pins
    ([] for any host)."""

    model_config = ConfigDict(extra="forbid")

    template: TemplateName | SkipJsonSchema[None] = None
    kind: PoolKind | SkipJsonSchema[None] = None
    assignment: Assignment | SkipJsonSchema[None] = None
    min_size: Size | SkipJsonSchema[None] = None
    max_size: Size | SkipJsonSchema[None] = None
    spare: Size | SkipJsonSchema[None] = None
    naming_pattern: str | SkipJsonSchema[None] = Field(default=None, max_length=255)
    clone_mode: CloneMode | SkipJsonSchema[None] = None
    on_logout: OnLogout | SkipJsonSchema[None] = None
    one_time: Flag | SkipJsonSchema[None] = None
    max_age_s: Seconds | None = None
    power_policy: PowerPolicy | SkipJsonSchema[None] = None
    canary: Size | SkipJsonSchema[None] = None
    reservation_timeout_s: Seconds | SkipJsonSchema[None] = None
    idle_timeout_s: Seconds | None = None
    disconnect_timeout_s: Seconds | None = None
    session_start_timeout_s: Seconds | SkipJsonSchema[None] = None
    roaming_profiles: Flag | SkipJsonSchema[None] = None
    second_session: SecondSession | SkipJsonSchema[None] = None
    revert_by: RevertBy | SkipJsonSchema[None] = None
    user_layer_mib: LayerMib | SkipJsonSchema[None] = None
    profile_exclusions: list[ExclusionPath] | SkipJsonSchema[None] = Field(default=None,
                                                                        max_length=32)
    redirect_folders: list[RedirectFolder] | SkipJsonSchema[None] = Field(default=None,
                                                                        max_length=16)
    placement: Placement | SkipJsonSchema[None] = None
    balance: Flag | SkipJsonSchema[None] = None
    hosts: list[HostName] | SkipJsonSchema[None] = Field(default=None, max_length=100)
    offline: OfflinePolicyChange | SkipJsonSchema[None] = None

    @model_validator(mode="before")
    @classmethod
    def no_null_but_limits(cls, data: Any) -> Any:
        """Only the limits that may be absent can be cleared with null; leaving a setting
        out keeps it."""
        return refuse_nulls(data, allowed=NULLABLE_POOL_SETTINGS)


def refuse_nulls(data: Any, allowed: frozenset[str] = frozenset()) -> Any:
    if isinstance(data, dict):
        cleared = sorted(str(k) for k, v in data.items() if v is None and k not in allowed)
        if cleared:
            raise ValueError(f"{', '.join(cleared)} cannot be null; leave them out to keep "
                             "their value")
    return data


class PoolResize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_size: Size | SkipJsonSchema[None] = None
    max_size: Size | SkipJsonSchema[None] = None
    spare: Size | SkipJsonSchema[None] = None

    @model_validator(mode="before")
    @classmethod
    def no_null(cls, data: Any) -> Any:
        return refuse_nulls(data)


class RolloutRequest(BaseModel):
    version: Annotated[int, Field(ge=1, le=1_000_000), NUMBER] | None = Field(
        default=None, description="default: the template's latest")
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
    second_session: SecondSession = SecondSession.MERGE
    revert_by: RevertBy = RevertBy.SNAPSHOT
    user_layer_mib: LayerMib = 0
    profile_exclusions: list[str] = Field(default_factory=list)
    redirect_folders: list[str] = Field(default_factory=list)
    balance: bool = False  # the load balancer may move its desktops
    # The template version's disk cannot be used (missing or corrupt): why, since when, tries
    # failed and when the next one is due; None when the pool is fine.
    fault: str | None = None
    fault_since: datetime | None = None
    fault_failures: int = 0
    fault_retry_at: datetime | None = None
    offline: OfflinePolicyBody = Field(default_factory=OfflinePolicyBody)


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

    # Paths on the broker: never empty (no default file stands in for a missing one).
    image: str | None = Field(default=None, min_length=1, max_length=4096, pattern=NO_NUL)
    kernel: str | None = Field(default=None, min_length=1, max_length=4096, pattern=NO_NUL)
    initrd: str | None = Field(default=None, min_length=1, max_length=4096, pattern=NO_NUL)
    cmdline: str | None = Field(default=None, max_length=4096, pattern=NO_NUL)
    built_flavor: Flavor | None = None
    # Default: cloud-init for the cloudinit flavor, else fw_cfg.
    customization: Customization | None = None
    vcpus: Annotated[int, Field(ge=1, le=256), NUMBER] = 1
    memory_mib: Annotated[int, Field(ge=128, le=4 * 1024 * 1024), NUMBER] | None = None
    notes: str = Field(default="", max_length=4096, pattern=NO_NUL)
    runs_on: str = Field(default="", max_length=128, pattern=r"^[A-Za-z0-9_, -]*$")
    arch: str = Field(default="", max_length=32, pattern=r"^[A-Za-z0-9_]*$")
    user_data: str | None = Field(default=None, max_length=256 * 1024, pattern=NO_NUL)
    join_hook: str | None = Field(default=None, max_length=64 * 1024, pattern=NO_NUL)


Overcommit = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False), NUMBER]


class HostCreate(BaseModel):
    name: HostName
    uri: str = Field(max_length=1024, pattern=HYPERVISOR_URI)

    @field_validator("uri")
    @classmethod
    def parses(cls, uri: str) -> str:
        try:
            urlsplit(uri).port  # noqa: B018  (reading it checks the host and port)
        except ValueError as exc:
            raise ValueError(f"not a URI: {exc}") from None
        return uri
    cpu_overcommit: Overcommit = 4.0
    memory_overcommit: Overcommit = 1.0
    max_desktops: Annotated[int, Field(ge=0, le=100_000), NUMBER] | None = None
    max_provisioning: Annotated[int, Field(ge=1, le=1000), NUMBER] = 2
    transfer_slots: Annotated[int, Field(ge=1, le=1000), NUMBER] = 2
    # The shared storage its storage directory is on (hosts of one name see the same files).
    shared_storage: HostName | None = None
    host_set: HostSetName | None = Field(default=None, description="its host set (none: the "
                                         "default set); balancing moves stay in a set")


class SharedStorageRequest(BaseModel):
    shared_storage: HostName | None


class HostUpdate(BaseModel):
    """What changes on a host: its host set (null: back to the default set)."""

    host_set: HostSetName | None


class HostSetBalance(BaseModel):
    balance: Flag = Field(description="the load balancer may move any running desktop on "
                          "the set's hosts, within the set")


class HostSetView(BaseModel):
    name: str
    balance: bool
    hosts: list[str]


class DrainRequest(BaseModel):
    grace_s: Annotated[int, Field(ge=0, le=7 * 86400), NUMBER] = 1800


class MigrateRequest(BaseModel):
    """Where a desktop moves live: a host by name, or the one placement picks."""

    target: Annotated[str | None, Field(pattern=HOST_NAME, max_length=63)] = None


class MigrationView(BaseModel):
    desktop: str
    source: str
    target: str
    seconds: float
    memory_bytes: int
    disk_bytes: int
    downtime_ms: int | None


# --- what the admin listings answer: each enum typed, so a client knows every value -------------

class HostAdminView(BaseModel):
    id: uuid.UUID
    name: str
    uri: str
    state: HostState
    domain_type: DomainType
    storage_dir: str | None
    hypervisor: str
    arch: str
    cpu_model: str
    vcpus: int
    memory_mib: int
    storage_free_bytes: int
    cpu_overcommit: float
    memory_overcommit: float
    max_desktops: int | None
    max_provisioning: int
    transfer_slots: int
    desktops: int
    last_seen_at: datetime | None
    last_error: str | None
    drain_deadline: datetime | None
    shared_storage: str | None = None
    host_set: str | None = None  # None: the default set
    set_balances: bool = False  # the host's set has balancing on


class TemplateVersionAdminView(BaseModel):
    id: uuid.UUID
    template: str
    number: int
    image_path: str
    image_sha256: str
    image_size_bytes: int
    customization: Customization
    published_at: datetime
    has_user_data: bool
    has_join_hook: bool


class GrantView(BaseModel):
    pool: str
    kind: PrincipalKind
    principal: str


class DesktopAdminView(BaseModel):
    id: uuid.UUID
    name: str
    hostname: str
    state: DesktopState
    power_state: PowerState
    task: DesktopTask | None
    host: str
    pool: str | None
    version: int
    user: str | None
    last_error: str | None
    retry_count: int
    state_changed_at: datetime
    console_connections: int
    placement_reason: str | None
    notice: str | None


class SessionAdminView(BaseModel):
    desktop_id: uuid.UUID
    desktop: str
    user: str | None
    state: DesktopState
    reserved_at: datetime | None
    console_connections: int
    disconnected_at: datetime | None
    guest_user: str | None
