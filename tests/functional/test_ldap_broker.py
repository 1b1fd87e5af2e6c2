"""LDAP users through the broker's HTTP API: a user entitled through a directory group gets a
desktop; a user outside the group is refused, with an event for the admin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.ldap_auth import LdapAuthenticator, LdapSettings
from deskpool.drivers.registry import forget_fake_hosts
from tests.broker_world import BrokerWorld, make_world
from tests.ldap_server import GROUPS_DN, PEOPLE_DN, READER_DN, READER_PASSWORD, SlapdServer


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    with SlapdServer() as server:
        yield server


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab")
    EntitlementService(w.ctx).grant("lab", "group", "vdi-users")
    w.user("root", admin=True)
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def ldap(slapd: SlapdServer) -> LdapAuthenticator:
    return LdapAuthenticator(LdapSettings(
        url=slapd.url, bind_dn=READER_DN, bind_password=READER_PASSWORD,
        user_base=PEOPLE_DN, group_base=GROUPS_DN, timeout_s=2))


def test_a_directory_user_entitled_by_group_gets_a_desktop(
        world: BrokerWorld, slapd: SlapdServer) -> None:
    client = world.client(directories=[ldap(slapd)])
    signed = client.post("/api/v1/auth/login", json={"username": "alice",
                                                      "password": "alice-pw"})
    assert signed.status_code == 200, signed.text
    assert signed.json()["user"]["source"] == "ldap"
    assert "vdi-users" in signed.json()["user"]["groups"]
    assert [p["name"] for p in client.get("/api/v1/pools").json()] == ["lab"]
    handover = client.post("/api/v1/pools/lab/connect").json()
    assert handover["status"] == "ready" and handover["desktop"].startswith("lab-")


def test_a_directory_user_outside_the_group_is_refused(
        world: BrokerWorld, slapd: SlapdServer) -> None:
    client = world.client(directories=[ldap(slapd)])
    assert client.post("/api/v1/auth/login", json={"username": "bob",
                                                    "password": "bob-pw"}).status_code == 200
    assert client.get("/api/v1/pools").json() == []
    refused = client.post("/api/v1/pools/lab/connect")
    assert refused.status_code == 403 and "not entitled" in refused.json()["detail"]
    client.app.state.services.broker.records.flush()  # type: ignore[attr-defined]
    events = world.client("root").get("/api/v1/admin/events").json()
    assert any(e["kind"] == "logon-refused" and e["user"] == "bob" for e in events)
    held = [d for d in world.client("root").get("/api/v1/admin/desktops").json()
            if d["user"] is not None]
    assert held == []


def test_a_wrong_directory_password_is_refused(world: BrokerWorld, slapd: SlapdServer) -> None:
    client = world.client(directories=[ldap(slapd)])
    answer = client.post("/api/v1/auth/login", json={"username": "alice", "password": "x"})
    assert answer.status_code == 401


def test_an_unreachable_directory_is_a_503_not_a_wrong_password(world: BrokerWorld) -> None:
    dead = LdapAuthenticator(LdapSettings(
        url="ldap://127.0.0.1:1", bind_dn=READER_DN, bind_password=READER_PASSWORD,
        user_base=PEOPLE_DN, group_base=GROUPS_DN, timeout_s=1))
    answer = world.client(directories=[dead]).post(
        "/api/v1/auth/login", json={"username": "alice", "password": "alice-pw"})
    assert answer.status_code == 503 and "127.0.0.1:1" in answer.json()["detail"]
