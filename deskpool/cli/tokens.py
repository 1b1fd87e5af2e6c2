"""``deskpool token create|list|revoke``: API tokens made, listed and revoked from the broker's
own machine (an administrator's recovery path, or a token for a script). Each expires; a
token made or revoked here is recorded in the audit log with the local login as its actor."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer
from rich.table import Table

from deskpool.broker.accounts import API_TOKEN_TTL, AccountService
from deskpool.broker.api_tokens import MAX_DAYS, TokenService
from deskpool.cli.common import out, services
from deskpool.domain.errors import InvalidInput
from deskpool.services.audit import Actor

token_app = typer.Typer(help="API tokens and sessions: make, list, revoke.",
                        no_args_is_help=True)


@token_app.command("create")
def token_create(
    user: str,
    label: Annotated[str, typer.Option(help="What the token is for")] = "",
    expires_in_days: Annotated[int, typer.Option(
        help=f"Days until it expires (1 to {MAX_DAYS})")] = API_TOKEN_TTL.days,
) -> None:
    """Make an API token for USER, printed this once (only its hash is kept)."""
    with services() as ctx:
        signed = TokenService(ctx, Actor.local()).issue(AccountService(ctx), user, label,
                                                        expires_in_days)
    out.print(f"token {signed.token_id} for {signed.identity.name}, expires "
              f"{signed.expires_at:%Y-%m-%d %H:%M} UTC (shown once):")
    out.print(signed.token, markup=False, highlight=False)


@token_app.command("list")
def token_list(
    user: Annotated[str | None, typer.Option(help="Only this user's tokens")] = None,
) -> None:
    """Live tokens (API tokens and browser sessions), newest first; never their secrets."""
    with services() as ctx:
        tokens = TokenService(ctx).list(user)
    table = Table("id", "user", "kind", "label", "created (UTC)", "expires (UTC)")
    for t in tokens:
        table.add_row(str(t.id), t.user, t.kind, t.label, f"{t.created_at:%Y-%m-%d %H:%M}",
                      f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never")
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str) -> None:
    """Revoke a token by its id (from ``deskpool token list``): it opens nothing from now on."""
    try:
        parsed = uuid.UUID(token_id)
    except ValueError:
        raise InvalidInput(f"token id {token_id!r} is not a token id (a UUID from "
                           "'deskpool token list')") from None
    with services() as ctx:
        view = TokenService(ctx, Actor.local()).revoke(parsed)
    out.print(f"{view.kind} token {view.id} of {view.user} revoked")
