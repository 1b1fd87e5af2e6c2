"""Repositories for the broker's people and grants: users and their local groups, sign-in and
API tokens, and entitlements (which users and groups may use which pools).

Like every repository, these never commit; the service that owns the operation does.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, delete, or_, select, update
from sqlalchemy.orm import Session

from deskpool.domain.pools import Assignment, PoolKind
from deskpool.store.access_models import AuthToken, Entitlement, Group, GroupMember, User
from deskpool.store.models import Pool, Template


class UserRepository:
    """Users and their membership of local groups."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def find_by_name(self, name: str) -> User | None:
        return self._session.scalars(select(User).where(User.name == name)).first()

    def name_taken(self, name: str) -> bool:
        return self._session.scalars(select(User.id).where(User.name == name)).first() is not None

    def add(self, user: User) -> User:
        """Insert ``user`` now (flushed), so its id is known and a clash raises at once."""
        self._session.add(user)
        self._session.flush([user])
        return user

    def list(self) -> builtins.list[User]:
        return builtins.list(self._session.scalars(select(User).order_by(User.name)))

    def group_names(self, user_id: uuid.UUID) -> frozenset[str]:
        """The local groups the user is a member of."""
        return frozenset(self._session.scalars(
            select(Group.name).join(GroupMember, GroupMember.group_id == Group.id)
            .where(GroupMember.user_id == user_id)))

    def group_names_by_user(self) -> dict[uuid.UUID, frozenset[str]]:
        """Every user's local groups, in one query (users in no group are left out)."""
        found: dict[uuid.UUID, set[str]] = {}
        for user_id, name in self._session.execute(
                select(GroupMember.user_id, Group.name)
                .join(Group, Group.id == GroupMember.group_id)):
            found.setdefault(user_id, set()).add(name)
        return {user_id: frozenset(names) for user_id, names in found.items()}

    def delete(self, user: User) -> None:
        """Delete the user; their tokens and group memberships go with them (CASCADE)."""
        self._session.execute(delete(AuthToken).where(AuthToken.user_id == user.id))
        self._session.execute(delete(GroupMember).where(GroupMember.user_id == user.id))
        self._session.delete(user)
        self._session.flush()

    def groups(self) -> builtins.list[tuple[str, builtins.list[str]]]:
        """Every local group with its members' names, by name."""
        members: dict[str, builtins.list[str]] = {}
        for group, user in self._session.execute(
                select(Group.name, User.name)
                .outerjoin(GroupMember, GroupMember.group_id == Group.id)
                .outerjoin(User, User.id == GroupMember.user_id)
                .order_by(Group.name, User.name)):
            members.setdefault(group, [])
            if user is not None:
                members[group].append(user)
        return sorted(members.items())

    def find_group(self, name: str) -> Group | None:
        return self._session.scalars(select(Group).where(Group.name == name)).first()

    def add_group(self, name: str) -> Group:
        group = Group(name=name)
        self._session.add(group)
        self._session.flush([group])
        return group

    def delete_group(self, group: Group) -> None:
        self._session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
        self._session.delete(group)
        self._session.flush()

    def remove_from_group(self, user_id: uuid.UUID, group_id: uuid.UUID) -> bool:
        result = cast(CursorResult[Any], self._session.execute(delete(GroupMember).where(
            GroupMember.user_id == user_id, GroupMember.group_id == group_id)))
        return bool(result.rowcount)

    def add_to_group(self, user_id: uuid.UUID, group: str) -> None:
        """Make the user a member of ``group``, creating the group if it is new; a member
        already is left as is."""
        found = self._session.scalars(select(Group).where(Group.name == group)).first()
        if found is None:
            found = Group(name=group)
            self._session.add(found)
            self._session.flush([found])
        if self._session.get(GroupMember, (found.id, user_id)) is None:
            self._session.add(GroupMember(group_id=found.id, user_id=user_id))


@dataclass(frozen=True)
class TokenHolder:
    """Who a sign-in or API token belongs to, and whether it still holds."""

    groups: str  # as stored: comma-separated, lower case
    expires_at: datetime | None
    revoked_at: datetime | None
    name: str
    display_name: str
    source: str
    is_admin: bool
    disabled: bool
    uid_number: int | None = None
    gid_number: int | None = None


@dataclass(frozen=True)
class TokenRow:
    """A token as its owner and the admin see it: never its secret nor its hash."""

    id: uuid.UUID
    user: str
    kind: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


_TOKEN_ROW = (AuthToken.id, User.name, AuthToken.kind, AuthToken.label, AuthToken.created_at,
              AuthToken.expires_at, AuthToken.revoked_at)


class AuthTokenRepository:
    """Browser sessions and API tokens, found by the SHA-256 of their secret."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, *, token_hash: str, user_id: uuid.UUID, kind: str, label: str, groups: str,
            expires_at: datetime | None) -> uuid.UUID:
        """Store a new token; its id (which names it in lists, never its secret)."""
        token_id = uuid.uuid4()
        self._session.add(AuthToken(id=token_id, token_hash=token_hash, user_id=user_id,
                                    kind=kind, label=label, groups=groups,
                                    expires_at=expires_at))
        return token_id

    def live(self, now: datetime, user_id: uuid.UUID | None = None) -> builtins.list[TokenRow]:
        """Tokens neither revoked nor expired, of one user or of all, newest first."""
        query = (select(*_TOKEN_ROW).join(User, User.id == AuthToken.user_id)
                 .where(AuthToken.revoked_at.is_(None),
                        or_(AuthToken.expires_at.is_(None), AuthToken.expires_at > now))
                 .order_by(AuthToken.created_at.desc(), AuthToken.id))
        if user_id is not None:
            query = query.where(AuthToken.user_id == user_id)
        return [TokenRow(*row) for row in self._session.execute(query)]

    def find(self, token_id: uuid.UUID) -> TokenRow | None:
        row = self._session.execute(select(*_TOKEN_ROW).join(User, User.id == AuthToken.user_id)
                                    .where(AuthToken.id == token_id)).first()
        return TokenRow(*row) if row is not None else None

    def id_of(self, token_hash: str) -> uuid.UUID | None:
        return self._session.scalars(select(AuthToken.id)
                                     .where(AuthToken.token_hash == token_hash)).first()

    def revoke_id(self, token_id: uuid.UUID, at: datetime) -> bool:
        """Revoke the token by its id; False if it was revoked already (or never was)."""
        result = cast(CursorResult[Any], self._session.execute(
            update(AuthToken).where(AuthToken.id == token_id, AuthToken.revoked_at.is_(None))
            .values(revoked_at=at)))
        return bool(result.rowcount)

    def holder(self, token_hash: str) -> TokenHolder | None:
        """The token's user and validity, or None for a token never issued."""
        row = self._session.execute(
            select(AuthToken.groups, AuthToken.expires_at, AuthToken.revoked_at,
                   User.name, User.display_name, User.source, User.is_admin, User.disabled,
                   User.uid_number, User.gid_number)
            .join(User, User.id == AuthToken.user_id)
            .where(AuthToken.token_hash == token_hash)).first()
        return TokenHolder(*row) if row is not None else None

    def revoke_all(self, user_id: uuid.UUID, at: datetime) -> int:
        """Revoke every live token of the user (a disabled user, a new password); how many."""
        result = cast(CursorResult[Any], self._session.execute(
            update(AuthToken).where(AuthToken.user_id == user_id,
                                    AuthToken.revoked_at.is_(None)).values(revoked_at=at)))
        return int(result.rowcount)

    def revoke(self, token_hash: str, at: datetime) -> None:
        """Revoke the token if it is not already revoked."""
        self._session.execute(update(AuthToken)
                              .where(AuthToken.token_hash == token_hash,
                                     AuthToken.revoked_at.is_(None))
                              .values(revoked_at=at))


@dataclass(frozen=True)
class EntitledPool:
    """A pool someone is entitled to, with what a user's pool list shows of it."""

    id: uuid.UUID
    name: str
    template: str
    kind: PoolKind
    assignment: Assignment


def _granted_to(name: str, groups: Iterable[str]) -> ColumnElement[bool]:
    """Entitlements granted to the user ``name`` or to one of ``groups``."""
    conditions = [(Entitlement.principal_kind == "user") & (Entitlement.principal == name)]
    group_list = sorted(groups)
    if group_list:
        conditions.append((Entitlement.principal_kind == "group")
                          & Entitlement.principal.in_(group_list))
    return or_(*conditions)


class EntitlementRepository:
    """Grants of a pool to a user or a group, by name (directory groups need no row)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def pool_names_for(self, name: str, groups: Iterable[str]) -> builtins.list[str]:
        """The names of the pools granted to the user or one of their groups, sorted."""
        return builtins.list(self._session.scalars(
            select(Pool.name).join(Entitlement, Entitlement.pool_id == Pool.id)
            .where(_granted_to(name, groups)).distinct().order_by(Pool.name)))

    def pools_for(self, name: str, groups: Iterable[str]) -> builtins.list[EntitledPool]:
        """The pools granted to the user or one of their groups, with their template's name,
        sorted by name; one query."""
        granted = select(Entitlement.pool_id).where(_granted_to(name, groups))
        return [EntitledPool(*row) for row in self._session.execute(
            select(Pool.id, Pool.name, Template.name, Pool.kind, Pool.assignment)
            .join(Template, Template.id == Pool.template_id)
            .where(Pool.id.in_(granted)).order_by(Pool.name))]

    def exists(self, pool_id: uuid.UUID, kind: str, principal: str) -> bool:
        return self._session.scalars(select(Entitlement.id).where(
            Entitlement.pool_id == pool_id, Entitlement.principal_kind == kind,
            Entitlement.principal == principal)).first() is not None

    def add(self, pool_id: uuid.UUID, kind: str, principal: str) -> None:
        self._session.add(Entitlement(pool_id=pool_id, principal_kind=kind,
                                      principal=principal))

    def remove(self, pool_id: uuid.UUID, kind: str, principal: str) -> bool:
        """Delete the grant; False if there was none."""
        result = cast(CursorResult[Any], self._session.execute(delete(Entitlement).where(
            Entitlement.pool_id == pool_id, Entitlement.principal_kind == kind,
            Entitlement.principal == principal)))
        return bool(result.rowcount)

    def remove_principal(self, kind: str, principal: str) -> builtins.list[str]:
        """Delete every grant to the principal; the names of the pools they were for."""
        pools = builtins.list(self._session.scalars(
            select(Pool.name).join(Entitlement, Entitlement.pool_id == Pool.id)
            .where(Entitlement.principal_kind == kind, Entitlement.principal == principal)
            .order_by(Pool.name)))
        self._session.execute(delete(Entitlement).where(
            Entitlement.principal_kind == kind, Entitlement.principal == principal))
        return pools

    def list(self, pool_id: uuid.UUID | None = None) -> builtins.list[tuple[str, str, str]]:
        """(pool name, principal kind, principal) of every grant, or of one pool's."""
        query = (select(Pool.name, Entitlement.principal_kind, Entitlement.principal)
                 .join(Pool, Pool.id == Entitlement.pool_id)
                 .order_by(Pool.name, Entitlement.principal_kind, Entitlement.principal))
        if pool_id is not None:
            query = query.where(Pool.id == pool_id)
        return [(p, k, n) for p, k, n in self._session.execute(query)]
