"""Request dependencies: who is calling (a session cookie or a bearer token), and the
services, which live on ``app.state`` for the life of the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTickets
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import AuthenticationFailed, Forbidden
from deskpool.domain.users import Identity
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
    return await run_in_threadpool(svc.accounts.resolve, token)


CurrentUser = Annotated[Identity, Depends(current_user)]


async def admin_user(user: CurrentUser) -> Identity:
    if not user.is_admin:
        raise Forbidden("this needs an administrator")
    return user


AdminUser = Annotated[Identity, Depends(admin_user)]
