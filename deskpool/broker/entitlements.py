"""Entitlements: which users and groups may use which pools."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from sqlalchemy import delete, or_, select

from deskpool.broker.accounts import normalize_name
from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.users import Identity
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import Entitlement
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Pool

KINDS = ("user", "group")


@dataclass(frozen=True)
class Grant:
    pool: str
    kind: str
    principal: str


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidInput(f"an entitlement is granted to a 'user' or a 'group', not {kind!r}")


def entitled_pool_names(uow: UnitOfWork, identity: Identity) -> list[str]:
    """Pools this identity may use: granted to its name or to one of its groups."""
    conditions = [(Entitlement.principal_kind == "user") & (Entitlement.principal ==
                                                            identity.name)]
    if identity.groups:
        conditions.append((Entitlement.principal_kind == "group")
                          & Entitlement.principal.in_(sorted(identity.groups)))
    return list(uow.session.scalars(
        select(Pool.name).join(Entitlement, Entitlement.pool_id == Pool.id)
        .where(or_(*conditions)).distinct().order_by(Pool.name)))


class EntitlementService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def grant(self, pool: str, kind: str, principal: str) -> Grant:
        _check_kind(kind)
        name = normalize_name(principal, f"{kind} name")
        with self.ctx.uow() as uow:
            found = uow.pools.get_by_name(pool)
            exists = uow.session.scalars(select(Entitlement.id).where(
                Entitlement.pool_id == found.id, Entitlement.principal_kind == kind,
                Entitlement.principal == name)).first()
            if exists is not None:
                raise Conflict(f"{kind} {name!r} is already entitled to pool {pool!r}")
            uow.session.add(Entitlement(pool_id=found.id, principal_kind=kind, principal=name))
            uow.commit()
        return Grant(pool=pool, kind=kind, principal=name)

    def revoke(self, pool: str, kind: str, principal: str) -> None:
        _check_kind(kind)
        name = normalize_name(principal, f"{kind} name")
        with self.ctx.uow() as uow:
            found = uow.pools.get_by_name(pool)
            result = uow.session.execute(delete(Entitlement).where(
                Entitlement.pool_id == found.id, Entitlement.principal_kind == kind,
                Entitlement.principal == name))
            if not getattr(result, "rowcount", 0):
                raise NotFound(f"{kind} {name!r} has no entitlement to pool {pool!r}")
            uow.commit()

    def list(self, pool: str | None = None) -> list[Grant]:
        with self.ctx.uow(read_only=True) as uow:
            query = (select(Pool.name, Entitlement.principal_kind, Entitlement.principal)
                     .join(Pool, Pool.id == Entitlement.pool_id)
                     .order_by(Pool.name, Entitlement.principal_kind, Entitlement.principal))
            if pool is not None:
                query = query.where(Pool.id == uow.pools.get_by_name(pool).id)
            return [Grant(pool=p, kind=k, principal=n) for p, k, n in uow.session.execute(query)]

    def pools_for(self, identity: Identity) -> builtins.list[str]:
        with self.ctx.uow(read_only=True) as uow:
            return entitled_pool_names(uow, identity)
