"""The audit trail: every administrator's action is an ``audit`` event in the event log, with
who did it (``actor``), from which address, to what (``target``, e.g. ``pool/lab``), when,
and the values before and after as JSON. Written in the same transaction as the change it
records wherever the change is one transaction, so the log never shows a change that rolled
back. The CLI's actions are audited too: their actor is the local login, their address
``local``.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deskpool.services.context import ServiceContext
from deskpool.store.db import UnitOfWork

AUDIT = "audit"
Values = Mapping[str, Any] | None


@dataclass(frozen=True)
class Actor:
    """Who asks for an admin action, and from where."""

    name: str
    address: str | None = None

    @classmethod
    def local(cls) -> Actor:
        """The person at this machine's command line."""
        try:
            login = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container)
            login = "unknown"
        return cls(name=f"cli:{login}", address="local")


@dataclass(frozen=True)
class AuditView:
    id: int
    at: datetime
    actor: str | None
    address: str | None
    action: str
    target: str | None
    message: str
    old: Any
    new: Any


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_json_ready(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # enums, uuids, datetimes


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                      dict[str, Any]]:
    """Only the fields that differ, before and after."""
    keys = [k for k in new if old.get(k) != new.get(k)]
    return {k: old.get(k) for k in keys}, {k: new[k] for k in keys}


def record_audit(uow: UnitOfWork, actor: Actor | None, action: str, target: str,
                 message: str, *, old: Values = None, new: Values = None,
                 pool: str | None = None, user: str | None = None) -> None:
    """Add the audit event to ``uow`` (committed with the change). ``action`` is e.g.
    ``pool.update``; no actor: an internal caller, recorded as ``system``."""
    details = json.dumps({"action": action, "old": _json_ready(old), "new": _json_ready(new)},
                         sort_keys=True)
    who = actor.name if actor else "system"
    uow.events.add(AUDIT, f"{who}: {message}", user=user, pool=pool, actor=who,
                   remote_addr=actor.address if actor else None, target=target,
                   details=details)


def audit(ctx: ServiceContext, actor: Actor | None, action: str, target: str, message: str,
          *, old: Values = None, new: Values = None, pool: str | None = None,
          user: str | None = None) -> None:
    """An audit event in its own transaction, for an action done in several (a publish
    copies files before it writes its row): recorded once the action succeeded."""
    with ctx.uow() as uow:
        record_audit(uow, actor, action, target, message, old=old, new=new, pool=pool,
                     user=user)
        uow.commit()


def audit_log(ctx: ServiceContext, *, limit: int = 200, actor: str | None = None,
              target: str | None = None) -> list[AuditView]:
    """The newest audit events, newest first; filtered by actor and by target (``pool``
    finds every ``pool/...``)."""
    with ctx.uow(read_only=True) as uow:
        views = []
        for e in uow.events.recent(limit, kind=AUDIT, actor=actor, target=target):
            details = json.loads(e.details) if e.details else {}
            views.append(AuditView(id=e.id, at=e.at, actor=e.actor, address=e.remote_addr,
                                   action=details.get("action", ""), target=e.target,
                                   message=e.message, old=details.get("old"),
                                   new=details.get("new")))
        return views
