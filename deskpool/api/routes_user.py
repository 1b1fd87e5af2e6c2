"""What every signed-in user may do: sign in and out, list their pools, connect, open the
console, log off. Every route but sign-in needs a session or token; every desktop route checks
that the desktop is the caller's."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request, Response

from deskpool.api.deps import SESSION_COOKIE, CurrentUser, ServicesDep, token_of
from deskpool.api.schemas import (
    ConsoleTicketResponse,
    HandoverResponse,
    LoginRequest,
    LoginResponse,
    MyDesktop,
    PoolEntry,
    PoolPath,
    StateResponse,
    UserMessage,
    UserPublic,
    errors,
)
from deskpool.domain.errors import Conflict, Forbidden
from deskpool.domain.states import HELD_STATES, DesktopState
from deskpool.domain.users import Identity
from deskpool.services.events import messages_for
from deskpool.store.desktop_listings import PoolAvailability
from deskpool.store.models import Desktop

# Every route here may answer bad input (a body past the cap too); all but sign-in answer 401
# without credentials.
router = APIRouter(prefix="/api/v1", responses=errors(413, 422))


def user_public(identity: Identity) -> UserPublic:
    return UserPublic(name=identity.name, display_name=identity.display_name,
                      source=identity.source, groups=sorted(identity.groups),
                      is_admin=identity.is_admin)


@router.post("/auth/login", response_model=LoginResponse, tags=["auth"],
             responses=errors(400, 401, 429, 503))
def login(body: LoginRequest, request: Request, response: Response,
          svc: ServicesDep) -> LoginResponse:
    # The peer's address: behind a reverse proxy every client shares the proxy's.
    address = request.client.host if request.client else None
    signed = svc.accounts.sign_in(body.username, body.password, address=address)
    response.set_cookie(SESSION_COOKIE, signed.token, httponly=True, samesite="strict",
                        max_age=12 * 3600, path="/", secure=request.url.scheme == "https")
    return LoginResponse(token=signed.token, expires_at=signed.expires_at,
                         user=user_public(signed.identity))


@router.post("/auth/logout", status_code=204, tags=["auth"], responses=errors(401))
def logout(request: Request, response: Response, user: CurrentUser,
           svc: ServicesDep) -> None:
    token = token_of(request)
    if token:
        svc.accounts.sign_out(token)
    response.delete_cookie(SESSION_COOKIE, path="/")


# API tokens (made, listed, revoked): deskpool.api.routes_tokens.


@router.get("/me", response_model=UserPublic, tags=["auth"], responses=errors(401))
def me(user: CurrentUser) -> UserPublic:
    return user_public(user)


@router.get("/ping", tags=["auth"], responses=errors(401))
def ping(user: CurrentUser) -> dict[str, bool]:
    """A no-op that still authenticates: the baseline the logon benchmark compares with."""
    return {"ok": True}


@router.get("/pools", response_model=list[PoolEntry], tags=["user"], responses=errors(401))
def my_pools(user: CurrentUser, svc: ServicesDep) -> list[PoolEntry]:
    """The pools the caller is entitled to: two queries, however many pools and desktops."""
    with svc.ctx.uow(read_only=True) as uow:
        pools = uow.entitlements.pools_for(user.name, user.groups)
        seen = uow.desktop_listings.availability([p.id for p in pools], user.name)
    entries = []
    for pool in pools:
        available = seen.get(pool.id, PoolAvailability())
        entries.append(PoolEntry(name=pool.name, template=pool.template,
                                 kind=pool.kind, assignment=pool.assignment,
                                 ready=available.ready, mine=available.mine))
    return entries


@router.post("/pools/{pool}/connect", response_model=HandoverResponse, tags=["user"],
             responses=errors(401, 403, 404, 409, 502, 503))
def connect(pool: PoolPath, request: Request, user: CurrentUser,
            svc: ServicesDep) -> HandoverResponse:
    received = getattr(request.state, "received_at", time.monotonic())
    handover = svc.broker.connect(user, pool, received_at=received)
    return HandoverResponse(
        status=handover.status, pool=handover.pool, message=handover.message,
        logon_id=handover.logon_id, desktop_id=handover.desktop_id, desktop=handover.desktop,
        hostname=handover.hostname, reconnect=handover.reconnect,
        phases_ms=handover.phases_ms)


@router.get("/desktops", response_model=list[MyDesktop], tags=["user"],
            responses=errors(401))
def my_desktops(user: CurrentUser, svc: ServicesDep) -> list[MyDesktop]:
    with svc.ctx.uow(read_only=True) as uow:
        rows = uow.desktop_listings.held_by(user.name)
        return [MyDesktop(id=d.id, name=d.name, hostname=d.hostname, pool=pool_name,
                          state=d.state, connected=d.console_connections > 0,
                          notice=d.notice)
                for d, pool_name in rows]


@router.get("/messages", response_model=list[UserMessage], tags=["user"], responses=errors(401))
def my_messages(user: CurrentUser, svc: ServicesDep) -> list[UserMessage]:
    """The caller's newest messages: a desktop of theirs lost (its VM crashed, its host
    down) and what happens next."""
    return [UserMessage.model_validate({"at": e.at, "severity": e.severity,
                                        "desktop": e.desktop, "message": e.message})
            for e in messages_for(svc.ctx, user.name)]


def _own_desktop(svc: ServicesDep, user: Identity, desktop_id: uuid.UUID) -> Desktop:
    """The caller's held desktop; the same refusal whether it exists or not."""
    with svc.ctx.uow(read_only=True) as uow:
        desktop = uow.desktops.find(desktop_id)
        if (desktop is None or desktop.assigned_user != user.name
                or desktop.state not in HELD_STATES):
            raise Forbidden("you hold no such desktop; connect to a pool first")
        uow.detach(desktop)
        return desktop


@router.post("/desktops/{desktop_id}/console", response_model=ConsoleTicketResponse,
             tags=["user"], responses=errors(401, 403, 409, 502, 503))
def console_ticket(desktop_id: uuid.UUID, user: CurrentUser,
                   svc: ServicesDep) -> ConsoleTicketResponse:
    ticket = svc.tickets.issue(user, desktop_id)
    return ConsoleTicketResponse(token=ticket.token, desktop=ticket.desktop,
                                 expires_at=ticket.expires_at,
                                 websocket_port=svc.console_ws_port)


@router.post("/desktops/{desktop_id}/logoff", response_model=StateResponse, tags=["user"],
             responses=errors(401, 403, 409, 502, 503))
def log_off(desktop_id: uuid.UUID, user: CurrentUser, svc: ServicesDep) -> StateResponse:
    _own_desktop(svc, user, desktop_id)
    state = svc.sessions.log_off(desktop_id, by=user, reason="the user logged off")
    return StateResponse(desktop_id=desktop_id, state=DesktopState(state))


@router.get("/desktops/{desktop_id}/console.vv", response_class=Response, tags=["user"],
            responses=errors(401, 403, 409, 502, 503) | {200: {
                "content": {"application/x-virt-viewer": {"schema": {"type": "string"}}}}})
def console_vv(desktop_id: uuid.UUID, request: Request, user: CurrentUser,
               svc: ServicesDep) -> Response:
    """A remote-viewer (SPICE) file for the user's held desktop: it reaches the desktop
    through this broker's SPICE proxy with a ticket and a display password of its own,
    both valid for a minute."""
    _own_desktop(svc, user, desktop_id)  # another's desktop: Forbidden, whatever else
    if svc.spice_proxy_port is None:
        raise Conflict("this broker runs no SPICE proxy: use the console in the browser")
    vv = svc.tickets.spice_file(user, desktop_id,
                                proxy_host=(svc.ctx.settings.spice_proxy_host
                                            or request.url.hostname or "127.0.0.1"),
                                proxy_port=svc.spice_proxy_port)
    return Response(vv.text, media_type="application/x-virt-viewer", headers={
        "content-disposition": f'attachment; filename="{vv.desktop}.vv"'})


RDP_PASSWORD_HEADER = "X-Deskpool-Rdp-Password"


@router.get("/desktops/{desktop_id}/console.rdp", response_class=Response,
            tags=["user"], responses=errors(401, 403, 409, 502, 503) | {200: {
                "content": {"application/x-rdp": {"schema": {"type": "string"}}},
                "headers": {RDP_PASSWORD_HEADER: {
                    "description": "the one-time password of the file's account",
                    "schema": {"type": "string"}}}}})
def console_rdp(desktop_id: uuid.UUID, request: Request, user: CurrentUser,
                svc: ServicesDep) -> Response:
    """An RDP file (mstsc, xfreerdp) for the user's held desktop: it reaches the desktop's
    own RDP server through this broker's RDP proxy with a ticket valid for a minute, and
    signs in to the user's account with a one-time password, which comes in the
    ``X-Deskpool-Rdp-Password`` header (the file format has no clear-text password)."""
    _own_desktop(svc, user, desktop_id)  # another's desktop: Forbidden, whatever else
    if svc.rdp_proxy_port is None:
        raise Conflict("this broker runs no RDP proxy: use the console in the browser")
    rdp = svc.tickets.rdp_file(user, desktop_id,
                               proxy_host=(svc.ctx.settings.rdp_proxy_host
                                           or request.url.hostname or "127.0.0.1"),
                               proxy_port=svc.rdp_proxy_port)
    return Response(rdp.text, media_type="application/x-rdp", headers={
        "content-disposition": f'attachment; filename="{rdp.desktop}.rdp"',
        RDP_PASSWORD_HEADER: rdp.password, "cache-control": "no-store"})
