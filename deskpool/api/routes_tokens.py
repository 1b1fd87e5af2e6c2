"""API tokens and sessions: a user makes API tokens (each expires: 90 days unless asked, a
year at most), lists their live tokens and sessions, and revokes any of them; an administrator
lists and revokes any user's (audited)."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from deskpool.api.deps import AdminActor, AdminUser, CurrentUser, ServicesDep, token_of
from deskpool.api.schemas import NO_NUL, NUMBER, LoginResponse, UserPublic
from deskpool.broker.accounts import API_TOKEN_TTL
from deskpool.broker.api_tokens import MAX_DAYS, TokenService

router = APIRouter(prefix="/api/v1")
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such token or user"}}


class ApiTokenRequest(BaseModel):
    label: str = Field(default="", max_length=255, pattern=NO_NUL)
    expires_in_days: Annotated[int, Field(ge=1, le=MAX_DAYS), NUMBER] = Field(
        default=API_TOKEN_TTL.days, description=f"whole days, 1 to {MAX_DAYS}")


class ApiTokenIssued(LoginResponse):
    id: uuid.UUID
    label: str


class TokenPublic(BaseModel):
    """A token as its owner sees it: never its secret."""

    id: uuid.UUID
    user: str
    kind: Literal["api", "session"]
    label: str
    created_at: datetime
    expires_at: datetime | None
    current: bool  # the token this request was made with


@router.post("/auth/tokens", response_model=ApiTokenIssued, tags=["auth"])
def create_token(body: ApiTokenRequest, user: CurrentUser, svc: ServicesDep) -> ApiTokenIssued:
    """A new API token for the caller, shown this once; it expires after
    ``expires_in_days``."""
    signed = TokenService(svc.ctx).issue(svc.accounts, user.name, body.label,
                                         body.expires_in_days)
    assert signed.token_id is not None
    who = signed.identity
    return ApiTokenIssued(token=signed.token, expires_at=signed.expires_at, id=signed.token_id,
                          label=body.label,
                          user=UserPublic(name=who.name, display_name=who.display_name,
                                          source=who.source, groups=sorted(who.groups),
                                          is_admin=who.is_admin))


@router.get("/auth/tokens", response_model=list[TokenPublic], tags=["auth"])
def my_tokens(request: Request, user: CurrentUser, svc: ServicesDep) -> list[TokenPublic]:
    """The caller's live API tokens and sessions, newest first."""
    return [TokenPublic.model_validate(asdict(t)) for t in TokenService(svc.ctx).list(
        user.name, current_secret=token_of(request))]


@router.delete("/auth/tokens/{token_id}", status_code=204, tags=["auth"], responses=NOT_FOUND)
def revoke_my_token(token_id: uuid.UUID, user: CurrentUser, svc: ServicesDep) -> Response:
    """Revoke one of the caller's tokens or sessions: it opens nothing from now on."""
    TokenService(svc.ctx).revoke(token_id, owner=user.name)
    return Response(status_code=204)


@router.get("/admin/users/{name}/tokens", response_model=list[TokenPublic], tags=["admin"],
            responses=NOT_FOUND)
def user_tokens(name: str, request: Request, admin: AdminUser,
                svc: ServicesDep) -> list[TokenPublic]:
    """The user's live API tokens and sessions, newest first; ``current`` marks the one this
    request came with (an administrator looking at their own)."""
    return [TokenPublic.model_validate(asdict(t)) for t in TokenService(svc.ctx).list(
        name, current_secret=token_of(request))]


@router.delete("/admin/users/{name}/tokens/{token_id}", status_code=204, tags=["admin"],
               responses=NOT_FOUND)
def revoke_user_token(name: str, token_id: uuid.UUID, actor: AdminActor,
                      svc: ServicesDep) -> Response:
    """Revoke one of the user's tokens or sessions; recorded in the audit log."""
    TokenService(svc.ctx, actor).revoke(token_id, owner=name)
    return Response(status_code=204)
