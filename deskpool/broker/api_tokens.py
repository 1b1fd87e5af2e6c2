"""A user's tokens, listed and revoked: their API tokens (for scripts and native clients) and
their browser sessions. A list shows each token's id, kind, label and dates, never its secret
(only its SHA-256 is stored anyway). A user revokes their own; an administrator (the API's
admin routes, the CLI) any user's, and that is an audit event, as is a token the CLI makes
for a user. A revoked or expired token opens nothing from the next request on
(``AccountService.resolve``); so does every token of a disabled user.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskpool.broker.accounts import (
    API_TOKEN_MAX_TTL,
    AccountService,
    SignedIn,
    normalize_name,
    token_digest,
)
from deskpool.domain.errors import InvalidInput, NotFound
from deskpool.services.audit import Actor, audit, record_audit
from deskpool.services.context import ServiceContext
from deskpool.store.accounts import TokenRow
from deskpool.store.models import utcnow

MAX_DAYS = API_TOKEN_MAX_TTL.days


@dataclass(frozen=True)
class TokenView:
    id: uuid.UUID
    user: str
    kind: str  # "api" or "session"
    label: str
    created_at: datetime
    expires_at: datetime | None
    current: bool = False  # the token this request came with


def _view(row: TokenRow, current: uuid.UUID | None = None) -> TokenView:
    return TokenView(id=row.id, user=row.user, kind=row.kind, label=row.label,
                     created_at=row.created_at, expires_at=row.expires_at,
                     current=row.id == current)


def ttl_of(days: int) -> timedelta:
    """An API token's lifetime, checked: 1 to ``MAX_DAYS`` whole days."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"expires_in_days must be a whole number from 1 to {MAX_DAYS}, "
                           f"not {days!r}")
    return timedelta(days=days)


class TokenService:
    """Tokens of users; ``actor`` (an administrator, or the CLI's local login) is who revokes
    for the audit log: None when a user revokes their own."""

    def __init__(self, ctx: ServiceContext, actor: Actor | None = None) -> None:
        self.ctx = ctx
        self.actor = actor

    def issue(self, accounts: AccountService, user: str, label: str, days: int) -> SignedIn:
        """A new API token for ``user``. Made by an ``actor`` (the CLI's local login making
        one for a user, never the user for themselves) it is an audit event: who now holds a
        credential of that user's is an administrator's action."""
        signed = accounts.issue_api_token(user, label, ttl=ttl_of(days))
        if self.actor is not None:
            who = signed.identity.name
            audit(self.ctx, self.actor, "token.create", f"user/{who}",
                  f"made api token {signed.token_id} for {who}"
                  + (f" ({label})" if label else ""),
                  new={"token": str(signed.token_id), "kind": "api", "label": label,
                       "expires_at": signed.expires_at}, user=who)
        return signed

    def list(self, user: str | None = None, *,
             current_secret: str | None = None) -> list[TokenView]:
        """The live tokens of ``user`` (every user's when None), newest first."""
        with self.ctx.uow(read_only=True) as uow:
            user_id = None
            if user is not None:
                found = uow.users.find_by_name(normalize_name(user))
                if found is None:
                    raise NotFound(f"no user named {user!r}")
                user_id = found.id
            current = (uow.auth_tokens.id_of(token_digest(current_secret))
                       if current_secret else None)
            return [_view(row, current) for row in uow.auth_tokens.live(utcnow(), user_id)]

    def revoke(self, token_id: uuid.UUID, *, owner: str | None = None) -> TokenView:
        """Revoke one token. With ``owner``, only one of theirs: another's is "no such token",
        as one that never existed, so ids cannot be probed. Revoking a revoked token changes
        nothing."""
        with self.ctx.uow() as uow:
            row = uow.auth_tokens.find(token_id)
            if row is None or (owner is not None and row.user != normalize_name(owner)):
                whose = f" of user {owner!r}" if owner is not None else ""
                raise NotFound(f"no token{whose} with id {token_id}")
            if uow.auth_tokens.revoke_id(token_id, utcnow()) and self.actor is not None:
                record_audit(uow, self.actor, "token.revoke", f"user/{row.user}",
                             f"revoked {row.kind} token {token_id} of {row.user}"
                             + (f" ({row.label})" if row.label else ""),
                             old={"token": str(token_id), "kind": row.kind, "label": row.label,
                                  "expires_at": row.expires_at},
                             new={"revoked": True}, user=row.user)
            uow.commit()
        return _view(row)
