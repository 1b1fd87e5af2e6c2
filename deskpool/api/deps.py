"""Request dependencies: who is calling (a session cookie or a bearer token), and the
services, which live on ``app.state`` for the life of the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from deskpool.api.observability import note_user
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTickets
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import AuthenticationFailed, Forbidden
from deskpool.domain.users import Identity
from deskpool.services.audit import Actor
from deskpool.services.context import ServiceContext

SESSION_COOKIE = "deskpool_session"


@dataclass
class Services:
    ctx: ServiceContext
    accounts: AccountService
    entitlements: EntitlementService
    broker: Broker
    sessions: SessionService
    tickets: ConsoleTickets
    console_ws_port: int | None  # where the websockify console proxy listens
    spice_proxy_port: int | None = None  # where the SPICE proxy listens (None: not served)
    rdp_proxy_port: int | None = None  # where the RDP proxy listens (None: not served)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(SESSION_COOKIE) or None


async def current_user(request: Request, svc: ServicesDep) -> Identity:
    token = token_of(request)
    if token is None:
        raise AuthenticationFailed("sign in first: no session cookie or bearer token")
    identity = await run_in_threadpool(svc.accounts.resolve, token)
    note_user(identity.name)  # on the request's log lines from here on
    return identity


CurrentUser = Annotated[Identity, Depends(current_user)]


async def admin_user(user: CurrentUser) -> Identity:
    if not user.is_admin:
        raise Forbidden("this needs an administrator")
    return user


AdminUser = Annotated[Identity, Depends(admin_user)]


async def admin_actor(request: Request, admin: AdminUser) -> Actor:
    """The administrator and the address they call from, for the audit log."""
    return Actor(name=admin.name, address=request.client.host if request.client else None)


AdminActor = Annotated[Actor, Depends(admin_actor)]
