"""Entitlements: which users and groups may use which pools."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from deskpool.broker.accounts import normalize_name
from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.users import Identity
from deskpool.services.audit import Actor, record_audit
from deskpool.services.context import ServiceContext
from deskpool.store.db import UnitOfWork

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
    return uow.entitlements.pool_names_for(identity.name, identity.groups)


class EntitlementService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def grant(self, pool: str, kind: str, principal: str, *,
              actor: Actor | None = None) -> Grant:
        _check_kind(kind)
        name = normalize_name(principal, f"{kind} name")
        with self.ctx.uow() as uow:
            found = uow.pools.get_by_name(pool)
            if uow.entitlements.exists(found.id, kind, name):
                raise Conflict(f"{kind} {name!r} is already entitled to pool {pool!r}")
            uow.entitlements.add(found.id, kind, name)
            if actor is not None:
                record_audit(uow, actor, "entitlement.grant", f"pool/{pool}",
                             f"entitled {kind} {name} to pool {pool}",
                             new={"kind": kind, "principal": name}, pool=pool)
            uow.commit()
        return Grant(pool=pool, kind=kind, principal=name)

    def revoke(self, pool: str, kind: str, principal: str, *,
               actor: Actor | None = None) -> None:
        _check_kind(kind)
        name = normalize_name(principal, f"{kind} name")
        with self.ctx.uow() as uow:
            found = uow.pools.get_by_name(pool)
            if not uow.entitlements.remove(found.id, kind, name):
                raise NotFound(f"{kind} {name!r} has no entitlement to pool {pool!r}")
            if actor is not None:
                record_audit(uow, actor, "entitlement.revoke", f"pool/{pool}",
                             f"revoked {kind} {name}'s entitlement to pool {pool}",
                             old={"kind": kind, "principal": name}, pool=pool)
            uow.commit()

    def list(self, pool: str | None = None) -> list[Grant]:
        with self.ctx.uow(read_only=True) as uow:
            pool_id = uow.pools.get_by_name(pool).id if pool is not None else None
            return [Grant(pool=p, kind=k, principal=n)
                    for p, k, n in uow.entitlements.list(pool_id)]

    def pools_for(self, identity: Identity) -> builtins.list[str]:
        with self.ctx.uow(read_only=True) as uow:
            return entitled_pool_names(uow, identity)
