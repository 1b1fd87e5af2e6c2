"""The broker's tables: users and groups, entitlements, sign-in and console tokens, the event
log and logon timings. Same portability rules as ``deskpool.store.models``."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from deskpool.domain.models import ConsoleProtocol
from deskpool.store.models import Base, _str_enum, utcnow

NAME_LENGTH = 255
# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit sequence.
EVENT_ID = BigInteger().with_variant(Integer(), "sqlite")


class User(Base):
    """A person who may sign in. ``password_hash`` is None for directory (LDAP) users, whose
    row is created at their first sign-in and only remembers them for the admin."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    display_name: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    source: Mapped[str] = mapped_column(String(16), default="local")
    password_hash: Mapped[str | None] = mapped_column(Text)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column()
    # A directory user's uidNumber / gidNumber as the directory gave them at their last
    # sign-in (None: it has none, or a local user): what their desktop account is made with.
    uid_number: Mapped[int | None] = mapped_column(Integer)
    gid_number: Mapped[int | None] = mapped_column(Integer)


class LinuxAccount(Base):
    """The Linux account a deskpool user gets on every desktop: its name (by the rule in
    ``deskpool.domain.accounts``) and a uid, allocated once so files keep one owner on every
    desktop. A local user's uid is allocated from ``FIRST_UID`` on and is also their private
    group's gid; a directory user with ``uidNumber`` (and ``gidNumber``) gets those
    (``from_directory``). Unique account names refuse two users that map to one name; unique
    uids make racing brokers retry."""

    __tablename__ = "linux_accounts"

    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    account: Mapped[str] = mapped_column(String(32), unique=True)
    uid: Mapped[int] = mapped_column(Integer, unique=True)
    gid: Mapped[int] = mapped_column(Integer)
    from_directory: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Group(Base):
    """A local group; directory groups are looked up at sign-in instead."""

    __tablename__ = "groups"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Entitlement(Base):
    """Grants one pool to a user or a group, by name (so directory groups need no row)."""

    __tablename__ = "entitlements"
    __table_args__ = (Index(None, "pool_id", "principal_kind", "principal", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    pool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"))
    principal_kind: Mapped[str] = mapped_column(String(16))  # "user" or "group"
    principal: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuthToken(Base):
    """A browser session or an API token. Only the SHA-256 of the secret is stored.

    ``groups`` is the user's group names at sign-in (comma-separated, lower case), so a
    request needs no directory lookup; a new sign-in refreshes them.
    """

    __tablename__ = "auth_tokens"
    __table_args__ = (Index(None, "user_id"),)  # a user's tokens, listed

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "session" or "api"
    label: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    groups: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class ConsoleToken(Base):
    """A single-use, short-lived ticket that lets one user open one desktop's console."""

    __tablename__ = "console_tokens"
    __table_args__ = (Index(None, "desktop_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    desktop_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("desktops.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()
    # The display it opens: a browser's VNC ticket cannot open the SPICE proxy, nor the reverse.
    protocol: Mapped[ConsoleProtocol] = mapped_column(
        _str_enum(ConsoleProtocol), default=ConsoleProtocol.VNC)
    # An RDP ticket's one-time password, as the guest has it (SHA-256, hex): set again in the
    # guest when the client reconnects on the same ticket after its desktop moved.
    otp_digest: Mapped[str | None] = mapped_column(String(64))


class Event(Base):
    """What happened, for the admin: one line each, newest first in the UI.

    Names are copied rather than referenced: events outlive the desktops and pools they name.
    """

    __tablename__ = "events"
    __table_args__ = (Index(None, "at"), Index(None, "kind", "id"))

    id: Mapped[int] = mapped_column(EVENT_ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16), default="info")
    user_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    pool_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    desktop_id: Mapped[uuid.UUID | None] = mapped_column()
    desktop_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    message: Mapped[str] = mapped_column(Text)
    # An ``audit`` event (an administrator's action) says who did it, from which address, to
    # what, and the values before and after (JSON: {"old": ..., "new": ...}).
    actor: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    details: Mapped[str | None] = mapped_column(Text)


class Logon(Base):
    """One connect request and how long each phase of it took (milliseconds).

    queue: request received -> broker started on it; claim: reservation made; power_on:
    start/resume; ready: guest agent and display answered; connect: hand-over -> the user's
    console connected; session: ready -> the user's own graphical session running (desktop
flavor only). ``outcome`` is ready, pending (a desktop is being made), refused or
    failed.
    """

    __tablename__ = "logons"
    __table_args__ = (Index(None, "requested_at"), Index(None, "desktop_id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    pool_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    desktop_id: Mapped[uuid.UUID | None] = mapped_column()
    desktop_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    handed_over_at: Mapped[datetime | None] = mapped_column()
    reconnect: Mapped[bool] = mapped_column(Boolean, default=False)
    queue_ms: Mapped[int | None] = mapped_column(Integer)
    claim_ms: Mapped[int | None] = mapped_column(Integer)
    power_on_ms: Mapped[int | None] = mapped_column(Integer)
    ready_ms: Mapped[int | None] = mapped_column(Integer)
    session_ms: Mapped[int | None] = mapped_column(Integer)
    connect_ms: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")


class SignInThrottle(Base):
    """Failed sign-ins counted for one key: a user name (``kind`` "user", known or not) or a
    client address ("address"). In the database so every broker sees the same counts.
    ``locks`` counts the locks in a row, so each lock lasts twice the one before."""

    __tablename__ = "signin_throttles"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime] = mapped_column(default=utcnow)
    locks: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column()


class MachineCredential(Base):
    """A file a desktop gets at every boot (a keytab...), for a desktop name, encrypted with
    the installation's machine-secrets key (``deskpool.services.machine_secrets``): the
    database alone cannot read it."""

    __tablename__ = "machine_credentials"
    __table_args__ = (UniqueConstraint("desktop_name", "guest_path"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    desktop_name: Mapped[str] = mapped_column(String(255))
    guest_path: Mapped[str] = mapped_column(String(255))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)  # nonce, then AES-GCM output
    sha256: Mapped[str] = mapped_column(String(64))  # of the plain file: to tell copies apart
    size: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
