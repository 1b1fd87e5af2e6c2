"""A token the CLI makes for a user is an audit event, as its revocation was already: who now
holds a credential of that user's is an administrator's action. A user making a token for
themselves through the API is not one, and no audit entry ever holds a secret."""

from __future__ import annotations

from typer.testing import CliRunner

from deskpool.cli.main import app as cli
from deskpool.services.audit import audit_log
from tests.broker_world import BrokerWorld
from tests.functional.test_api_tokens import TOKENS, world

__all__ = ["world"]  # the fixture, shared with the token tests


def test_a_token_made_from_the_cli_is_audited_without_its_secret(world: BrokerWorld) -> None:
    made = CliRunner().invoke(cli, ["token", "create", "alice", "--label", "backup-job",
                                    "--expires-in-days", "30"])
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    token_id = made.output.split()[1]
    entry = audit_log(world.ctx, target="user/alice")[0]
    assert entry.action == "token.create"
    assert entry.actor is not None and entry.actor.startswith("cli:")
    assert entry.address == "local"
    assert entry.new["token"] == token_id and entry.new["label"] == "backup-job"
    assert entry.new["kind"] == "api" and entry.new["expires_at"]
    assert secret not in repr(entry)


def test_a_users_own_token_is_not_an_admin_action(world: BrokerWorld) -> None:
    before = len(audit_log(world.ctx))
    answer = world.client("alice").post(TOKENS, json={"label": "mine"})
    assert answer.status_code == 200, answer.text
    assert len(audit_log(world.ctx)) == before
