"""SQLAlchemy models: the broker's tables.

Portability rules, so the same schema serves SQLite now and PostgreSQL later:

* primary keys are ``sqlalchemy.Uuid`` (native ``uuid`` on PostgreSQL, ``CHAR(32)`` on SQLite);
* timestamps are timezone-aware UTC (:class:`UtcDateTime` refuses naive datetimes and hands back
  aware ones even from SQLite, which drops the zone);
* enums are plain strings (``native_enum=False`` with no CHECK constraint), so adding an enum
  value never needs a type migration;
* every constraint and index has a deterministic name (``NAMING_CONVENTION``), so migrations can
  refer to them on every backend.

Change a model only together with a new migration under ``migrations/versions``;
``tests/unit/test_migrations.py`` fails when the two disagree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    event,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from deskpool.domain.errors import Conflict, InvalidTransition
from deskpool.domain.models import (
    CloneMode,
    Customization,
    DomainType,
    HostState,
    PoolStatus,
    PowerState,
)
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PowerPolicy
from deskpool.domain.states import HELD_STATES, DesktopState, DesktopTask

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ENUM_LENGTH = 32
TASK_LENGTH = 64


def states_sql(states: frozenset[DesktopState]) -> str:
    """``state IN (...)`` for a set of the state table, in the table's order (a stable text
    for the partial index below and its migration)."""
    return "state IN ({})".format(", ".join(f"'{s.value}'" for s in DesktopState
                                             if s in states))


# The states in which a user holds a desktop, for the one-held-desktop-per-user index.
HELD_SQL = states_sql(HELD_STATES)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    Naive datetimes are refused on the way in (their zone is unknowable); values come back
    aware and in UTC, including from SQLite, which stores no zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored; use an aware UTC time")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _str_enum(enum_cls: type[StrEnum], length: int = ENUM_LENGTH) -> Enum:
    """A string column holding an enum's values (not its member names), without constraints."""
    return Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=length,
        validate_strings=True,
        values_callable=lambda cls: [member.value for member in cls],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), uuid.UUID: Uuid()}


class Installation(Base):
    """This deskpool deployment: one row, made with the database. Its id goes into every VM
    deskpool makes, so the brokers of another deployment sharing a host leave those VMs alone
    instead of taking them for a crash's leftovers."""

    __tablename__ = "installation"

    singleton: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    installation_id: Mapped[uuid.UUID] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Host(Base):
    """One hypervisor, reached through a libvirt URI."""

    __tablename__ = "hosts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    uri: Mapped[str] = mapped_column(String(1024))
    state: Mapped[HostState] = mapped_column(_str_enum(HostState), default=HostState.ENABLED)
    domain_type_requested: Mapped[DomainType] = mapped_column(
        _str_enum(DomainType), default=DomainType.AUTO
    )
    domain_type_resolved: Mapped[str | None] = mapped_column(String(16))
    # Path of the deskpool libvirt storage pool on that host.
    storage_dir: Mapped[str | None] = mapped_column(Text)
    # The shared storage that directory is on (hosts with one name see the same files at the
    # same path): its stateful desktops can be restarted on those hosts if it is lost.
    shared_storage: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Limits set by the admin (see ``deskpool.scheduler``).
    cpu_overcommit: Mapped[float] = mapped_column(Float, default=4.0)
    memory_overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    max_desktops: Mapped[int | None] = mapped_column(Integer)
    max_provisioning: Mapped[int] = mapped_column(Integer, default=2)
    transfer_slots: Mapped[int] = mapped_column(Integer, default=2)
    # Capacity as the hypervisor last reported it.
    hypervisor: Mapped[str] = mapped_column(String(32), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")
    cpu_model: Mapped[str] = mapped_column(String(128), default="")
    domain_types: Mapped[str] = mapped_column(String(128), default="")  # comma-separated
    vcpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    capacity_at: Mapped[datetime | None] = mapped_column()
    # Heartbeat: when it last answered, since when it has not, and why.
    last_seen_at: Mapped[datetime | None] = mapped_column()
    unreachable_since: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    # Drain: no new desktops or sessions; users logged off at the deadline.
    drain_deadline: Mapped[datetime | None] = mapped_column()
    # The host set it belongs to (None: the default set). Balancing moves stay in a set.
    host_set: Mapped[str | None] = mapped_column(String(63), index=True)

    def __repr__(self) -> str:
        return f"<Host {self.name!r} {self.uri!r} {self.state}>"


class Template(Base):
    """A golden image; its content lives in its versions."""

    __tablename__ = "templates"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<Template {self.name!r}>"


class TemplateVersion(Base):
    """One version of a template: a disk image plus boot settings.

    ``published_at is None`` marks a draft, which may still change. Once ``published_at`` is set
    and flushed, the version is immutable: any later UPDATE raises ``Conflict`` (see
    ``_refuse_published_changes`` below). Deleting a version is allowed while no desktop uses it.
    """

    __tablename__ = "template_versions"
    __table_args__ = (UniqueConstraint("template_id", "number"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    template_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_size_bytes: Mapped[int] = mapped_column(BigInteger)
    kernel_path: Mapped[str | None] = mapped_column(Text)
    initrd_path: Mapped[str | None] = mapped_column(Text)
    kernel_cmdline: Mapped[str | None] = mapped_column(Text)
    customization: Mapped[Customization] = mapped_column(
        _str_enum(Customization), default=Customization.FWCFG
    )
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    memory_mib: Mapped[int] = mapped_column(Integer, default=1024)
    recipe_hash: Mapped[str | None] = mapped_column(String(128))
    # What it runs on: libvirt hypervisor types (comma-separated, "" = any) and architecture.
    runs_on: Mapped[str] = mapped_column(String(128), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")  # "": not known, any host
    published_at: Mapped[datetime | None] = mapped_column(active_history=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    # The administrator's customization, as published (immutable like the rest): cloud-init
    # user data merged into each desktop's seed (cloud-init versions only), and the join hook
    # run once per desktop through the guest agent before it is ready (any guest with an agent).
    user_data: Mapped[str | None] = mapped_column(Text)
    join_hook: Mapped[str | None] = mapped_column(Text)

    # One-way on purpose: a ``Template.versions`` backref would put a new, not yet added version
    # into a persistent template's collection and make the flush before ``add``'s SAVEPOINT warn.
    # List versions with ``TemplateVersionRepository.list``; deleting a template deletes its
    # versions through the foreign key's ON DELETE CASCADE.
    template: Mapped[Template] = relationship()

    @property
    def is_published(self) -> bool:
        return self.published_at is not None

    def __repr__(self) -> str:
        return f"<TemplateVersion {self.template_id} #{self.number}>"


class Pool(Base):
    """Desktops made from one template, kept at a size by the reconciler.

    ``current_version_id`` is the version new desktops are made from (the rollout target);
    ``previous_version_id`` is what a rollback returns to.
    """

    __tablename__ = "pools"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    template_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("templates.id"))
    kind: Mapped[PoolKind] = mapped_column(_str_enum(PoolKind))
    assignment: Mapped[Assignment] = mapped_column(_str_enum(Assignment))
    min_size: Mapped[int] = mapped_column(Integer)
    max_size: Mapped[int] = mapped_column(Integer)
    spare: Mapped[int] = mapped_column(Integer)
    naming_pattern: Mapped[str] = mapped_column(String(255))
    clone_mode: Mapped[CloneMode] = mapped_column(_str_enum(CloneMode))
    on_logout: Mapped[OnLogout] = mapped_column(_str_enum(OnLogout))
    one_time: Mapped[bool] = mapped_column(Boolean, default=False)
    max_age_s: Mapped[int | None] = mapped_column(Integer)
    power_policy: Mapped[PowerPolicy] = mapped_column(_str_enum(PowerPolicy))
    canary: Mapped[int] = mapped_column(Integer, default=0)
    # Session timers (seconds); None: never. See ``deskpool.broker.sessions``.
    reservation_timeout_s: Mapped[int] = mapped_column(Integer, default=300)
    idle_timeout_s: Mapped[int | None] = mapped_column(Integer)
    disconnect_timeout_s: Mapped[int | None] = mapped_column(Integer)
    # How long a user's graphical session may take to start at hand-over.
    session_start_timeout_s: Mapped[int] = mapped_column(Integer, default=150)
    # The user's home follows them as a profile container (see deskpool.broker.profile_logon).
    roaming_profiles: Mapped[bool] = mapped_column(Boolean, default=False)
    # How a revert is done (domain.pools.RevertBy): its factory snapshot, or a fresh boot.
    revert_by: Mapped[str] = mapped_column(String(16), default="snapshot")
    # MiB of each desktop's user layer disk (domain.pools.PoolSpec.user_layer_mib); 0: none.
    user_layer_mib: Mapped[int] = mapped_column(Integer, default=0)
    # What a user's second concurrent session gets (domain.profile_merge.SecondSession).
    second_session: Mapped[str] = mapped_column(String(16), default="merge")
    # Paths inside the home kept out of users' profiles, one per line.
    profile_exclusions: Mapped[str] = mapped_column(Text, default="")
    # Folders of the home redirected to the user's file share, one per line (none: off).
    redirect_folders: Mapped[str] = mapped_column(Text, default="")
    # The load balancer may move its running desktops (domain.pools.PoolSpec.balance).
    balance: Mapped[bool] = mapped_column(Boolean, default=False)
    # Its offline policy (``domain.offline.OfflinePolicy`` as JSON); None: no offline use.
    offline_policy: Mapped[str | None] = mapped_column(Text)
    current_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("template_versions.id"))
    previous_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("template_versions.id")
    )
    placement: Mapped[str] = mapped_column(String(16), default="spread")  # or "pack"
    status: Mapped[PoolStatus] = mapped_column(_str_enum(PoolStatus), default=PoolStatus.ENABLED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The broker planning this pool now, until when (several brokers share the work).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()
    # Its template version's disk cannot be used (missing, or its checksum no longer
    # matches): no new desktops but one try per backoff, until it works again (see
    # ``deskpool.services.template_faults``). ``fault_stamp``: the disk file's size and
    # mtime at the last try, so a restored file is tried at once.
    fault: Mapped[str | None] = mapped_column(Text)
    fault_version_id: Mapped[uuid.UUID | None] = mapped_column()
    fault_since: Mapped[datetime | None] = mapped_column()
    fault_failures: Mapped[int] = mapped_column(Integer, default=0)
    fault_retry_at: Mapped[datetime | None] = mapped_column()
    fault_stamp: Mapped[str | None] = mapped_column(String(255))

    template: Mapped[Template] = relationship()
    current_version: Mapped[TemplateVersion] = relationship(foreign_keys=[current_version_id])

    def __repr__(self) -> str:
        return f"<Pool {self.name!r}>"


class PoolHost(Base):
    """A pool pinned to hosts: its desktops go only there (no rows: any host)."""

    __tablename__ = "pool_hosts"

    pool_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("pools.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)


class HostSet(Base):
    """A host set's own settings. Sets are named on hosts (``Host.host_set``); a row exists
    once an administrator has switched a set's balancing, and a set without one balances
    nothing of its own (its desktops still move if their pool balances)."""

    __tablename__ = "host_sets"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    # The load balancer may move any running desktop on the set's hosts, whatever its pool.
    balance: Mapped[bool] = mapped_column(Boolean, default=False)


class HostSlot(Base):
    """One of a host's slots for a kind of heavy work (``provisioning``, ``transfer``), held by
    one broker at a time until ``held_until``: the host's limits hold across brokers, and a
    dead broker's slots free themselves. Rows are made as slots are first needed."""

    __tablename__ = "host_slots"

    host_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(64))
    held_until: Mapped[datetime | None] = mapped_column()


class MemoryState(Base):
    """A booted template's saved memory and disk on one host: what instant clones restore."""

    __tablename__ = "memory_states"
    __table_args__ = (UniqueConstraint("version_id", "host_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("template_versions.id"))
    host_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("hosts.id"))
    disk_volume: Mapped[str] = mapped_column(String(255))
    memory_volume: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Desktop(Base):
    """One desktop VM and the identity deskpool gives it.

    ``state`` is a ``DesktopState`` of the transition table in ``deskpool.domain.states``. It is
    written only by ``DesktopRepository``'s compare-and-swap methods (single conditional
    UPDATEs checked against the table); an ORM flush that changes it raises
    ``InvalidTransition``. ``version`` is the ORM's
    optimistic-concurrency counter: every write, ORM or compare-and-set, increments it, and an
    ORM flush against a row someone else changed fails instead of overwriting it.
    """

    __tablename__ = "desktops"
    __table_args__ = (
        Index(None, "state"),
        Index(None, "host_id"),
        Index(None, "template_version_id"),
        Index(None, "pool_id"),
        Index(None, "pool_id", "state", "name"),  # the broker's "next free desktop" lookup
        # One held desktop per user and pool, enforced by the database itself, so two brokers
        # racing for one user can never both hand out a desktop.
        Index("uq_desktops_held_by_user", "pool_id", "assigned_user", unique=True,
              sqlite_where=text(HELD_SQL), postgresql_where=text(HELD_SQL)),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(63))
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    machine_id: Mapped[str] = mapped_column(String(32), unique=True)
    template_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("template_versions.id"))
    host_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("hosts.id"))
    clone_mode: Mapped[CloneMode] = mapped_column(_str_enum(CloneMode), default=CloneMode.LINKED)
    state: Mapped[DesktopState] = mapped_column(_str_enum(DesktopState))
    power_state: Mapped[PowerState] = mapped_column(
        _str_enum(PowerState), default=PowerState.UNKNOWN
    )
    task: Mapped[DesktopTask | None] = mapped_column(_str_enum(DesktopTask, TASK_LENGTH))
    last_error: Mapped[str | None] = mapped_column(Text)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    identity_confirmed_at: Mapped[datetime | None] = mapped_column()
    pool_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("pools.id"))
    assigned_user: Mapped[str | None] = mapped_column(String(255))
    has_factory_snapshot: Mapped[bool] = mapped_column(Boolean, default=False)
    sessions_served: Mapped[int] = mapped_column(Integer, default=0)
    # Retries with backoff: the reconciler leaves a failing desktop alone until then.
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # The user's session, as the console proxy and the guest report it.
    reserved_at: Mapped[datetime | None] = mapped_column()
    console_connections: Mapped[int] = mapped_column(Integer, default=0)
    disconnected_at: Mapped[datetime | None] = mapped_column()
    guest_user: Mapped[str | None] = mapped_column(String(255))
    # The user whose file share a session on it was given a password for: revoked at logoff
    # (deskpool.services.fileshare), whoever the desktop is assigned to by then.
    share_user: Mapped[str | None] = mapped_column(String(255))
    idle_since: Mapped[datetime | None] = mapped_column()
    # Shown to its user (e.g. "host maintenance: you will be logged off at 14:30").
    notice: Mapped[str | None] = mapped_column(Text)
    placement_reason: Mapped[str | None] = mapped_column(Text)
    # The host a live move is taking it to, while the move runs: the SPICE proxy lets the
    # user's client follow it there (deskpool.broker.console). No foreign key: only a hint.
    moving_to_id: Mapped[uuid.UUID | None] = mapped_column()
    # The broker acting on this desktop now, until when (several brokers share the work).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()
    # Its user layer as the desktop side last saw it (None: never checked, or no layer): the
    # template version number the layer sits on, its size and how many files it changes.
    layer_version: Mapped[int | None] = mapped_column(Integer)
    layer_bytes: Mapped[int | None] = mapped_column(BigInteger)
    layer_changed_files: Mapped[int | None] = mapped_column(Integer)
    layer_checked_at: Mapped[datetime | None] = mapped_column()
    version: Mapped[int] = mapped_column(Integer)

    host: Mapped[Host] = relationship()
    template_version: Mapped[TemplateVersion] = relationship()

    __mapper_args__ = {"version_id_col": version}

    def __repr__(self) -> str:
        return f"<Desktop {self.name!r} {self.state}>"


class LayerRebase(Base):
    """One rebase of a desktop's user layer onto a template version (issue 14): the counts of
    its ``RebaseReport`` and how it ended (``rebased`` or ``failed``, with the error). Its
    conflicts and notes are ``LayerRebaseItem`` rows. Versions are template version numbers."""

    __tablename__ = "layer_rebases"
    __table_args__ = (
        Index(None, "desktop_id", "finished_at"),
        Index(None, "pool_id", "new_version"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    desktop_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("desktops.id", ondelete="CASCADE"))
    pool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"))
    old_version: Mapped[int] = mapped_column(Integer)
    new_version: Mapped[int] = mapped_column(Integer)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    kept_count: Mapped[int] = mapped_column(Integer, default=0)
    dropped_count: Mapped[int] = mapped_column(Integer, default=0)
    conflict_count: Mapped[int] = mapped_column(Integer, default=0)
    note_count: Mapped[int] = mapped_column(Integer, default=0)
    excluded_count: Mapped[int] = mapped_column(Integer, default=0)
    layer_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[str] = mapped_column(String(16))  # rebased or failed
    error: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"<LayerRebase {self.desktop_id} {self.old_version}->{self.new_version} " \
               f"{self.outcome}>"


class LayerRebaseItem(Base):
    """A conflict (the new base won, the user's copy kept beside it) or a note (the user's
    version won) of one layer rebase."""

    __tablename__ = "layer_conflicts"
    __table_args__ = (Index(None, "rebase_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    rebase_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("layer_rebases.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    user_copy: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # conflict or note


# --- guards ---------------------------------------------------------------------------------


def _changed_columns(target: Base) -> list[str]:
    state = sa_inspect(target)
    return [
        attr.key
        for attr in state.mapper.column_attrs
        if state.attrs[attr.key].history.has_changes()
    ]


@event.listens_for(TemplateVersion, "before_update")
def _refuse_published_changes(
    mapper: Mapper[Any], connection: Connection, target: TemplateVersion
) -> None:
    changed = _changed_columns(target)
    if not changed:
        return
    history = sa_inspect(target).attrs["published_at"].history
    # The value the row had before this flush: "deleted" when it changed, else "unchanged".
    before = (history.deleted or history.unchanged or [None])[0]
    if before is None:
        return  # a draft (possibly being published right now) may change
    template_name = connection.execute(
        select(Template.name).where(Template.id == target.template_id)
    ).scalar_one_or_none()
    raise Conflict(
        f"template version {target.number} of {template_name!r} is published and cannot change "
        f"(tried to change {', '.join(sorted(changed))})"
    )


@event.listens_for(Desktop, "before_update")
def _refuse_orm_state_writes(mapper: Mapper[Any], connection: Connection, target: Desktop) -> None:
    if sa_inspect(target).attrs["state"].history.has_changes():
        raise InvalidTransition(
            f"desktop {target.name!r}: state is written only through "
            "DesktopRepository.compare_and_set_state, never by assigning Desktop.state"
        )
