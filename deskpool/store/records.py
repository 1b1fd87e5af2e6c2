"""Repositories for what the broker records: the admin's event log, logon timings, console
tickets, and batches of such rows written at once.

Like every repository, these never commit; the service that owns the operation does.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from deskpool.domain.models import ConsoleProtocol
from deskpool.store.access_models import ConsoleToken, Event, Logon, MachineCredential
from deskpool.store.models import Base


class EventRepository:
    """The admin's event log, one sentence per thing that happened."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, kind: str, message: str, *, severity: str = "info", user: str | None = None,
            pool: str | None = None, desktop_id: uuid.UUID | None = None,
            desktop: str | None = None, actor: str | None = None,
            remote_addr: str | None = None, target: str | None = None,
            details: str | None = None) -> None:
        self._session.add(Event(kind=kind, message=message, severity=severity, user_name=user,
                                pool_name=pool, desktop_id=desktop_id, desktop_name=desktop,
                                actor=actor, remote_addr=remote_addr, target=target,
                                details=details))

    def recent(self, limit: int, *, user: str | None = None, kind: str | None = None,
               actor: str | None = None, target: str | None = None) -> builtins.list[Event]:
        """The newest ``limit`` events, newest first; given ``user``, ``kind``, ``actor`` or
        ``target``, only those that match each (``target`` also matches its prefix up to a
        ``/``: ``pool`` finds ``pool/lab``)."""
        query = select(Event).order_by(Event.id.desc()).limit(limit)
        if user is not None:
            query = query.where(Event.user_name == user)
        if kind is not None:
            query = query.where(Event.kind == kind)
        if actor is not None:
            query = query.where(Event.actor == actor)
        if target is not None:
            query = query.where(or_(Event.target == target, Event.target.startswith(
                target + "/", autoescape=True)))
        return builtins.list(self._session.scalars(query))


class LogonRepository:
    """Logon timings, one row per connect request."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def latest_waiting_for_console(self, desktop_id: uuid.UUID) -> Logon | None:
        """The desktop's newest ready logon whose console has not connected yet."""
        return self._session.scalars(
            select(Logon).where(Logon.desktop_id == desktop_id, Logon.outcome == "ready",
                                Logon.connect_ms.is_(None))
            .order_by(Logon.requested_at.desc()).limit(1)).first()

    def signed_in_since(self, desktop_id: uuid.UUID, since: datetime) -> bool:
        """Whether a hand-over since ``since`` started a user's session on the desktop (the
        ``session`` phase ran): their account and files are on it then."""
        return self._session.scalars(
            select(Logon.id).where(Logon.desktop_id == desktop_id,
                                   Logon.session_ms.is_not(None),
                                   Logon.handed_over_at >= since).limit(1)).first() is not None

    def recent(self, limit: int) -> builtins.list[Logon]:
        """The newest ``limit`` logons, newest first."""
        return builtins.list(self._session.scalars(
            select(Logon).order_by(Logon.requested_at.desc()).limit(limit)))


class ConsoleTicketRepository:
    """Single-use console tickets, found by the SHA-256 of their secret."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, *, token_hash: str, user: str, desktop_id: uuid.UUID,
            expires_at: datetime, protocol: ConsoleProtocol = ConsoleProtocol.VNC,
            otp_digest: str | None = None) -> None:
        self._session.add(ConsoleToken(token_hash=token_hash, user_name=user,
                                       desktop_id=desktop_id, expires_at=expires_at,
                                       protocol=protocol, otp_digest=otp_digest))

    def use(self, token_hash: str, now: datetime,
            protocol: ConsoleProtocol = ConsoleProtocol.VNC) -> tuple[uuid.UUID, str] | None:
        """Mark the ticket used, if it is an unused, unexpired ticket for ``protocol``: one
        conditional UPDATE, so it is used at most once. Its (desktop id, user name); None
        when it could not be used."""
        used = self._session.execute(
            update(ConsoleToken)
            .where(ConsoleToken.token_hash == token_hash, ConsoleToken.used_at.is_(None),
                   ConsoleToken.expires_at > now, ConsoleToken.protocol == protocol)
            .values(used_at=now).returning(ConsoleToken.desktop_id, ConsoleToken.user_name)
        ).first()
        return (used[0], used[1]) if used is not None else None

    def used_since(self, token_hash: str, since: datetime | None,
                   protocol: ConsoleProtocol) -> tuple[uuid.UUID, str] | None:
        """A ``protocol`` ticket first used at ``since`` or later (None: ever used):
        (desktop id, user name)."""
        query = (select(ConsoleToken.desktop_id, ConsoleToken.user_name)
                 .where(ConsoleToken.token_hash == token_hash, ConsoleToken.used_at.is_not(None),
                        ConsoleToken.protocol == protocol))
        if since is not None:
            query = query.where(ConsoleToken.used_at >= since)
        row = self._session.execute(query).first()
        return (row[0], row[1]) if row is not None else None

    def otp_digest(self, token_hash: str) -> str | None:
        """The SHA-256 of the one-time password an RDP ticket was issued with."""
        return self._session.scalars(select(ConsoleToken.otp_digest)
                                     .where(ConsoleToken.token_hash == token_hash)).first()

    def expire_unused(self, desktop_id: uuid.UUID, now: datetime) -> None:
        """End every unused, unexpired ticket of the desktop now."""
        self._session.execute(update(ConsoleToken)
                              .where(ConsoleToken.desktop_id == desktop_id,
                                     ConsoleToken.used_at.is_(None),
                                     ConsoleToken.expires_at > now)
                              .values(expires_at=now)
                              .execution_options(synchronize_session=False))


class RecordBatchRepository:
    """Many new rows (events, logons) in multi-row INSERTs: Core, not the ORM's per-object
    bookkeeping, for a writer that shares the interpreter with the requests it serves."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def insert(self, rows: Sequence[Base]) -> None:
        """Insert ``rows`` (new, never added to a session). Rows are grouped by model and by
        the columns they set; Core fills in the columns' defaults for the rest."""
        groups: dict[tuple[type[Base], tuple[str, ...]], list[dict[str, Any]]] = {}
        for row in rows:
            values = {c.key: getattr(row, c.key) for c in sa_inspect(type(row)).column_attrs
                      if getattr(row, c.key) is not None}
            groups.setdefault((type(row), tuple(sorted(values))), []).append(values)
        for (model, _columns), values_list in groups.items():
            self._session.execute(insert(model), values_list)


class MachineCredentialRepository:
    """Machine credentials by desktop name and guest path (their content stays encrypted)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def put(self, desktop_name: str, guest_path: str, ciphertext: bytes, sha256: str,
            size: int) -> bool:
        """Store (or replace) one; True when it is new."""
        found = self.find(desktop_name, guest_path)
        if found is None:
            self._session.add(MachineCredential(desktop_name=desktop_name,
                                                guest_path=guest_path, ciphertext=ciphertext,
                                                sha256=sha256, size=size))
            return True
        found.ciphertext, found.sha256, found.size = ciphertext, sha256, size
        return False

    def find(self, desktop_name: str, guest_path: str) -> MachineCredential | None:
        return self._session.scalars(select(MachineCredential).where(
            MachineCredential.desktop_name == desktop_name,
            MachineCredential.guest_path == guest_path)).first()

    def for_desktop(self, desktop_name: str) -> builtins.list[MachineCredential]:
        return builtins.list(self._session.scalars(
            select(MachineCredential).where(MachineCredential.desktop_name == desktop_name)
            .order_by(MachineCredential.guest_path)))

    def list(self) -> builtins.list[MachineCredential]:
        return builtins.list(self._session.scalars(select(MachineCredential).order_by(
            MachineCredential.desktop_name, MachineCredential.guest_path)))

    def remove(self, desktop_name: str, guest_path: str) -> bool:
        found = self.find(desktop_name, guest_path)
        if found is not None:
            self._session.delete(found)
        return found is not None
