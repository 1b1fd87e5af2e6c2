"""API tokens through the API and the CLI, on the fake driver: every token expires (90 days
unless asked, a year at most), a user lists and revokes their own tokens and sessions (never
seeing a secret), an administrator any user's (audited), and a revoked, expired or disabled
user's token opens nothing from the next request on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from typer.testing import CliRunner

from deskpool.broker.accounts import AccountService
from deskpool.cli.common import out
from deskpool.cli.main import app as cli
from deskpool.domain.errors import InvalidInput
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.audit import audit_log
from deskpool.store.access_models import AuthToken
from tests.broker_world import PASSWORD, BrokerWorld, make_world

TOKENS = "/api/v1/auth/tokens"


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the CLI's database
    monkeypatch.setattr(out, "width", 300)
    w.pool("lab")
    w.user("alice", entitled_to=("lab",))
    w.user("bob", entitled_to=("lab",))
    w.user("root", admin=True)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def bearer(world: BrokerWorld, token: str) -> TestClient:
    client = world.client()
    client.headers["authorization"] = f"Bearer {token}"
    return client


def when(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def make_token(world: BrokerWorld, user: str, **body: object) -> dict[str, str]:
    answer = world.client(user).post(TOKENS, json=body)
    assert answer.status_code == 200, answer.text
    made: dict[str, str] = answer.json()
    return made


def test_a_token_expires_by_default_and_within_the_bound_asked(world: BrokerWorld) -> None:
    now = datetime.now(UTC)
    default = make_token(world, "alice", label="ci")
    assert timedelta(days=89, hours=23) < when(default["expires_at"]) - now < timedelta(days=91)
    assert default["label"] == "ci" and default["user"]["name"] == "alice"
    week = make_token(world, "alice", label="week", expires_in_days=7)
    assert timedelta(days=6) < when(week["expires_at"]) - now < timedelta(days=8)
    assert bearer(world, week["token"]).get("/api/v1/me").json()["name"] == "alice"
    for bad in (0, -1, 366, 10**9, "soon", 1.5, None):
        answer = world.client("alice").post(TOKENS, json={"expires_in_days": bad})
        assert answer.status_code == 422, (bad, answer.text)
        assert "expires_in_days" in answer.json()["detail"], answer.text
    # The service has the same bound, whoever calls it.
    with pytest.raises(InvalidInput, match="365 days at most"):
        AccountService(world.ctx).issue_api_token("alice", "x", ttl=timedelta(days=400))


def test_a_user_lists_their_tokens_and_sessions_and_never_a_secret(world: BrokerWorld) -> None:
    made = make_token(world, "alice", label="laptop")
    browser = world.client()
    signed = browser.post("/api/v1/auth/login", json={"username": "alice",
                                                      "password": PASSWORD}).json()
    listed = browser.get(TOKENS)  # through the session cookie
    assert listed.status_code == 200
    rows = listed.json()
    by_label = {r["label"]: r for r in rows}
    assert {"laptop", "tests", ""} <= set(by_label)  # the world's token; the session's
    assert by_label["laptop"]["id"] == made["id"] and by_label["laptop"]["kind"] == "api"
    assert by_label[""]["kind"] == "session" and by_label[""]["current"] is True
    assert not by_label["laptop"]["current"]
    assert all(r["user"] == "alice" and r["expires_at"] for r in rows)
    assert set(rows[0]) == {"id", "user", "kind", "label", "created_at", "expires_at",
                            "current"}
    with world.ctx.uow(read_only=True) as uow:
        hashes = [t.token_hash for t in uow.session.query(AuthToken)]
    for secret in (made["token"], signed["token"], *hashes):
        assert secret not in listed.text
    # Nobody else's are in it.
    assert all(r["user"] == "bob" for r in world.client("bob").get(TOKENS).json())


def test_a_user_revokes_their_own_token_and_no_one_elses(world: BrokerWorld) -> None:
    made = make_token(world, "alice", label="old")
    alice_bearer = bearer(world, made["token"])
    assert alice_bearer.get("/api/v1/me").status_code == 200
    # bob cannot revoke it, and hears what an id that does not exist gets.
    other = world.client("bob").delete(f"{TOKENS}/{made['id']}")
    unknown = world.client("bob").delete(f"{TOKENS}/{uuid.uuid4()}")
    assert other.status_code == unknown.status_code == 404
    assert other.json()["detail"].replace(made["id"], "X") == unknown.json()["detail"].replace(
        unknown.request.url.path.rsplit("/", 1)[1], "X")
    assert alice_bearer.get("/api/v1/me").status_code == 200
    assert world.client("bob").delete(f"{TOKENS}/not-a-uuid").status_code == 422
    # alice revokes it: it stops working at once, and leaves her list.
    assert world.client("alice").delete(f"{TOKENS}/{made['id']}").status_code == 204
    assert alice_bearer.get("/api/v1/me").status_code == 401
    assert alice_bearer.post("/api/v1/pools/lab/connect").status_code == 401
    assert made["id"] not in world.client("alice").get(TOKENS).text
    assert world.client("alice").delete(f"{TOKENS}/{made['id']}").status_code == 204  # again
    assert world.client("alice").get("/api/v1/me").status_code == 200  # her other token


def test_an_expired_token_opens_nothing(world: BrokerWorld) -> None:
    made = make_token(world, "alice", expires_in_days=1)
    client = bearer(world, made["token"])
    assert client.get("/api/v1/me").status_code == 200
    with world.ctx.uow() as uow:  # a day later
        uow.session.execute(update(AuthToken).where(AuthToken.id == uuid.UUID(made["id"]))
                            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        uow.commit()
    answer = client.get("/api/v1/me")
    assert answer.status_code == 401 and "sign in again" in answer.json()["detail"]
    assert made["id"] not in world.client("alice").get(TOKENS).text


def test_an_admin_lists_and_revokes_any_users_tokens_and_it_is_audited(
        world: BrokerWorld) -> None:
    made = make_token(world, "alice", label="script")
    root = world.client("root")
    listed = root.get("/api/v1/admin/users/alice/tokens")
    assert listed.status_code == 200
    assert made["id"] in {r["id"] for r in listed.json()}
    assert all(r["user"] == "alice" for r in listed.json())
    assert made["token"] not in listed.text
    assert root.get("/api/v1/admin/users/nobody/tokens").status_code == 404
    # A token of another user named under alice: not found, nothing revoked.
    bobs = world.client("bob").get(TOKENS).json()[0]["id"]
    assert root.delete(f"/api/v1/admin/users/alice/tokens/{bobs}").status_code == 404
    assert world.client("bob").get("/api/v1/me").status_code == 200
    assert world.client("alice").delete(
        f"/api/v1/admin/users/alice/tokens/{made['id']}").status_code == 403  # not an admin
    gone = root.delete(f"/api/v1/admin/users/alice/tokens/{made['id']}")
    assert gone.status_code == 204
    assert bearer(world, made["token"]).get("/api/v1/me").status_code == 401
    entry = audit_log(world.ctx, target="user/alice")[0]
    assert (entry.action, entry.actor, entry.address) == ("token.revoke", "root", "testclient")
    assert entry.old["token"] == made["id"] and entry.old["label"] == "script"
    assert entry.new == {"revoked": True}


def test_disabling_a_user_stops_every_token_of_theirs_at_once(world: BrokerWorld) -> None:
    made = make_token(world, "alice")
    browser = world.client()
    assert browser.post("/api/v1/auth/login", json={"username": "alice",
                                                    "password": PASSWORD}).status_code == 200
    clients = [bearer(world, made["token"]), browser, world.client("alice")]
    assert all(c.get("/api/v1/me").status_code == 200 for c in clients)
    assert world.client("root").post("/api/v1/admin/users/alice/disable").status_code == 200
    for client in clients:
        assert client.get("/api/v1/me").status_code == 401
        assert client.post("/api/v1/pools/lab/connect").status_code == 401
    assert world.client("root").get("/api/v1/admin/users/alice/tokens").json() == []
    # Enabled again, the old tokens stay dead: she signs in anew.
    assert world.client("root").post("/api/v1/admin/users/alice/enable").status_code == 200
    assert all(c.get("/api/v1/me").status_code == 401 for c in clients)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def test_the_cli_makes_lists_and_revokes_tokens(world: BrokerWorld) -> None:
    output = invoke("token", "create", "alice", "--label", "backup-job",
                    "--expires-in-days", "30")
    secret = output.strip().splitlines()[-1]
    token_id = output.split()[1]
    assert bearer(world, secret).get("/api/v1/me").json()["name"] == "alice"
    listed = invoke("token", "list", "--user", "alice")
    assert token_id in listed and "backup-job" in listed and secret not in listed
    assert "bob" in invoke("token", "list") and "bob" not in listed
    refused = CliRunner().invoke(cli, ["token", "create", "alice", "--expires-in-days", "400"])
    # (``deskpool``'s entry point prints a DeskpoolError as its one line)
    assert isinstance(refused.exception, InvalidInput)
    assert "expires_in_days must be" in str(refused.exception)
    bad = CliRunner().invoke(cli, ["token", "revoke", "nope"])
    assert isinstance(bad.exception, InvalidInput) and "not a token id" in str(bad.exception)
    assert "revoked" in invoke("token", "revoke", token_id)
    assert bearer(world, secret).get("/api/v1/me").status_code == 401
    entry = audit_log(world.ctx, target="user/alice")[0]
    assert entry.action == "token.revoke" and entry.actor.startswith("cli:")
