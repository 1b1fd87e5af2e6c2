"""The broker's HTTP application: the REST API, the portal and admin pages, noVNC's files.

Errors deskpool raises on purpose become one JSON ``{"detail": sentence}`` with a status that
says whose fault it is; anything else is a 500 whose detail says to look at the server log.
A ``TemporaryError`` (a full pool, a service that did not answer) says "try again": a 503, with
``Retry-After`` when the error knows how long to wait; a sign-in locked out after too many
failures is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from deskpool.api import (
    metrics,
    routes_admin,
    routes_admin_manage,
    routes_layers,
    routes_machine_secrets,
    routes_offline,
    routes_profiles,
    routes_tokens,
    routes_user,
)
from deskpool.api.allow import AllowHeader
from deskpool.api.csrf import CsrfGuard
from deskpool.api.deps import Services
from deskpool.api.limits import BodyLimit
from deskpool.api.observability import RequestContext, health
from deskpool.api.openapi import install as install_openapi
from deskpool.api.security_headers import SecurityHeaders
from deskpool.api.server_errors import ServerErrors
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTickets
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.ldap_auth import LdapAuthenticator, LdapSettings
from deskpool.broker.records import RecordWriter
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain import errors
from deskpool.domain.users import Authenticator
from deskpool.services.context import ServiceContext
from deskpool.web import pages

log = logging.getLogger(__name__)

# The first kind an error is wins: a silent guest agent is a DriverError before it is a
# TemporaryError, and stays a 502.
STATUS: list[tuple[type[errors.DeskpoolError], int]] = [
    (errors.AuthenticationFailed, 401),
    (errors.SignInLocked, 429),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.InvalidInput, 400),
    (errors.PoolExhausted, 503),
    (errors.Unavailable, 503),
    (errors.HypervisorUnreachable, 503),
    (errors.DriverError, 502),
    (errors.TemporaryError, 503),
]


def status_of(exc: errors.DeskpoolError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


def retry_headers(exc: errors.DeskpoolError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) for a temporary error that knows its delay."""
    if isinstance(exc, errors.TemporaryError) and exc.delay is not None:
        return {"Retry-After": str(max(0, math.ceil(exc.delay)))}
    return {}


class ArrivalTime:
    """Stamps each request with the moment it arrived, before it waits for a worker thread:
    the start of a logon's "queue" phase."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["received_at"] = time.monotonic()
        await self.app(scope, receive, send)


def directories_from(settings: Settings) -> list[Authenticator]:
    if not settings.ldap_url:
        return []
    if not settings.ldap_user_base or not settings.ldap_group_base:
        raise errors.InvalidInput("DESKPOOL_LDAP_URL is set, so DESKPOOL_LDAP_USER_BASE and "
                                  "DESKPOOL_LDAP_GROUP_BASE must be set too")
    ldap = LdapSettings(
        url=settings.ldap_url, bind_dn=settings.ldap_bind_dn,
        bind_password=settings.ldap_bind_password, user_base=settings.ldap_user_base,
        group_base=settings.ldap_group_base)
    if settings.ldap_user_filter:
        ldap = replace(ldap, user_filter=settings.ldap_user_filter)
    if settings.ldap_group_filter:
        ldap = replace(ldap, group_filter=settings.ldap_group_filter)
    return [LdapAuthenticator(ldap)]


def create_app(ctx: ServiceContext, *, directories: Sequence[Authenticator] | None = None,
               console_ws_port: int | None = None, spice_proxy_port: int | None = None,
               rdp_proxy_port: int | None = None, novnc_dir: Path | None = None) -> FastAPI:
    app = FastAPI(title="deskpool", version="0.1.0",
                  description="VDI broker: pools of virtual desktops on libvirt hosts")
    found = directories_from(ctx.settings) if directories is None else list(directories)
    app.state.services = Services(
        ctx=ctx, accounts=AccountService(ctx, found), entitlements=EntitlementService(ctx),
        # Logon records are batched (50 ms): a storm of logons shares their writes.
        broker=Broker(ctx, records=RecordWriter(ctx, interval_s=0.05)),
        sessions=SessionService(ctx), tickets=ConsoleTickets(ctx),
        console_ws_port=console_ws_port, spice_proxy_port=spice_proxy_port,
        rdp_proxy_port=rdp_proxy_port)

    @app.exception_handler(errors.DeskpoolError)
    async def deskpool_error(request: Request, exc: errors.DeskpoolError) -> JSONResponse:
        code = status_of(exc)
        if code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=code,
                            headers=retry_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{' '.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors())
        return JSONResponse({"detail": f"bad input: {problems}"}, status_code=422)

    app.include_router(routes_user.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_admin_manage.router)
    app.include_router(routes_machine_secrets.router)
    app.include_router(routes_tokens.router)
    app.include_router(routes_profiles.router)
    app.include_router(routes_offline.router)
    app.include_router(routes_layers.router)
    app.include_router(health)
    app.include_router(metrics.router)
    app.state.metrics_registry = metrics.registry_for(ctx)
    app.include_router(pages.router)
    novnc = novnc_dir or ctx.settings.novnc_dir
    if (novnc / "core" / "rfb.js").is_file():
        app.mount("/novnc", StaticFiles(directory=novnc), name="novnc")
    install_openapi(app)
    app.add_middleware(ServerErrors)  # innermost: its 500 passes through all that follow
    app.add_middleware(AllowHeader, routes=app.router.routes)
    app.add_middleware(CsrfGuard, allowed_hosts=ctx.settings.console_allowed_origins)
    app.add_middleware(SecurityHeaders, docs_paths=(app.docs_url or "", app.redoc_url or ""))
    app.add_middleware(ArrivalTime)
    app.add_middleware(BodyLimit)  # a body past 1 MiB is refused before it is read
    app.add_middleware(RequestContext)  # outermost: its id is on every line a request logs
    return app
