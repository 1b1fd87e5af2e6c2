"""The API's doors, on the fake driver: every route but sign-in wants a valid session or token,
every admin route an administrator; one user can never reach another's desktop through any
route; console tickets open once, briefly, and only for the session they were issued in;
signing out kills the session token."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import update
from starlette.routing import BaseRoute

from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTickets
from deskpool.domain.errors import AuthenticationFailed
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.store.access_models import User
from tests.broker_world import PASSWORD, BrokerWorld, make_world

SIGN_IN = ("POST", "/api/v1/auth/login")


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab")  # spare 2, max 4
    w.user("alice", entitled_to=("lab",))
    w.user("bob", entitled_to=("lab",))
    w.user("root", admin=True)
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def walk(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, also inside included routers (newer FastAPI keeps an included router
    as one entry of ``app.routes`` instead of copying its routes in)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from walk(route.original_router.routes)
        elif isinstance(getattr(route, "routes", None), list):
            yield from walk(route.routes)


def api_routes(world: BrokerWorld) -> list[tuple[str, str, APIRoute]]:
    """(method, path, route) for every API route of the app, sign-in excepted."""
    app = world.client().app
    assert isinstance(app, FastAPI)
    found = [(method, route.path, route) for route in walk(app.routes)
             if route.path.startswith("/api/v1/") for method in sorted(route.methods)]
    # Guard against a test that passes because it found nothing to knock on, or knocks on
    # the wrong paths: every documented API operation is among them.
    documented = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
                  if path.startswith("/api/v1/") for method in operations}
    assert documented <= {(m, p) for m, p, _ in found}, documented - {(m, p) for m, p, _ in
                                                                      found}
    paths = {path for _, path, _ in found}
    assert {"/api/v1/pools/{pool}/connect", "/api/v1/desktops/{desktop_id}/console",
            "/api/v1/admin/desktops", "/api/v1/auth/logout"} <= paths, paths
    return [r for r in found if (r[0], r[1]) != SIGN_IN]


def url_of(route: APIRoute, values: dict[str, str]) -> str:
    return route.path.format(**{name: values.get(name, "x") for name in route.param_convertors})


def call(client: TestClient, method: str, url: str) -> tuple[int, str]:
    """One request with no body: authentication must refuse before any body is looked at."""
    answer = client.request(method, url)
    return answer.status_code, answer.text


def connect(world: BrokerWorld, user: str, pool: str = "lab") -> dict[str, str]:
    answer = world.client(user).post(f"/api/v1/pools/{pool}/connect")
    assert answer.status_code == 200 and answer.json()["status"] == "ready", answer.text
    body: dict[str, str] = answer.json()
    return body


def desktop_row(world: BrokerWorld, desktop_id: str) -> tuple[str, str | None]:
    with world.ctx.uow(read_only=True) as uow:
        desktop = uow.desktops.get(uuid.UUID(desktop_id))
        return desktop.state, desktop.assigned_user


# --- (a) every route wants a caller, every admin route an administrator --------------------


def bad_tokens(world: BrokerWorld) -> dict[str, str]:
    """Tokens that must open nothing: unknown, expired, revoked, of a disabled user."""
    accounts = AccountService(world.ctx)
    expired = accounts.issue_api_token("alice", "old", ttl=timedelta(seconds=-1)).token
    revoked = accounts.sign_in("alice", PASSWORD).token
    accounts.sign_out(revoked)
    world.user("mallory")
    with world.ctx.uow() as uow:
        uow.session.execute(update(User).where(User.name == "mallory").values(disabled=True))
        uow.commit()
    return {"unknown": "not-a-token-" + uuid.uuid4().hex, "expired": expired,
            "revoked": revoked, "disabled user's": world.tokens["mallory"]}


def test_every_api_route_but_sign_in_refuses_a_caller_without_valid_credentials(
        world: BrokerWorld) -> None:
    desktop = connect(world, "alice")["desktop_id"]  # real ids, so only the caller is wrong
    values = {"pool": "lab", "desktop_id": desktop, "kind": "user", "principal": "alice"}
    bad = bad_tokens(world)
    anonymous = world.client()
    failures = []
    for method, path, route in api_routes(world):
        url = url_of(route, values)
        status, text = call(anonymous, method, url)
        if status != 401:
            failures.append(f"{method} {path} without credentials: {status} {text[:120]}")
        for label, token in bad.items():
            for client in (TestClient(anonymous.app, headers={"authorization":
                                                              f"Bearer {token}"}),
                           # a browser's cookie, from the portal's own page (CSRF passes)
                           TestClient(anonymous.app, cookies={"deskpool_session": token},
                                      headers={"origin": "http://testserver"})):
                status, text = call(client, method, url)
                if status != 401:
                    failures.append(f"{method} {path} with an {label} token: {status} "
                                    f"{text[:120]}")
    assert not failures, "\n".join(failures)
    assert desktop_row(world, desktop) == ("reserved", "alice")  # nobody touched it


def test_every_admin_route_refuses_a_user_who_is_not_an_administrator(
        world: BrokerWorld) -> None:
    desktop = connect(world, "alice")["desktop_id"]
    values = {"pool": "lab", "desktop_id": desktop, "kind": "user", "principal": "alice"}
    admin_routes = [r for r in api_routes(world) if r[1].startswith("/api/v1/admin/")]
    assert len(admin_routes) >= 10
    failures = []
    for user in ("alice", "bob"):
        client = world.client(user)
        for method, path, route in admin_routes:
            status, text = call(client, method, url_of(route, values))
            if status != 403:
                failures.append(f"{user}: {method} {path}: {status} {text[:120]}")
    assert not failures, "\n".join(failures)
    assert desktop_row(world, desktop) == ("reserved", "alice")
    assert world.client("root").get("/api/v1/admin/desktops").status_code == 200


# --- (b) one user cannot reach another's desktop ----------------------------------------------


def test_a_user_cannot_reach_another_users_desktop_through_any_route(
        world: BrokerWorld) -> None:
    mine = connect(world, "alice")
    a_id, a_name = mine["desktop_id"], mine["desktop"]
    bob = world.client("bob")
    # Connecting to the same pool gives bob a desktop of his own, never alice's.
    his = connect(world, "bob")
    assert his["desktop_id"] != a_id
    assert connect(world, "bob")["desktop_id"] == his["desktop_id"]  # his reconnect too
    # Every route that takes a desktop id refuses alice's, and says exactly what it says of
    # an id that does not exist (so ids cannot be probed).
    values = {"pool": "lab", "kind": "user", "principal": "alice"}
    by_id = [r for r in api_routes(world) if "desktop_id" in r[2].param_convertors]
    assert {p for _, p, _ in by_id} >= {
        "/api/v1/desktops/{desktop_id}/console", "/api/v1/desktops/{desktop_id}/console.vv",
        "/api/v1/desktops/{desktop_id}/logoff", "/api/v1/admin/desktops/{desktop_id}/logoff"}
    for method, path, route in by_id:
        status, text = call(bob, method, url_of(route, {**values, "desktop_id": a_id}))
        assert status == 403, f"{method} {path}: {status} {text}"
        assert a_name not in text and "token" not in text
        unknown = call(bob, method, url_of(route, {**values,
                                                   "desktop_id": str(uuid.uuid4())}))
        assert unknown == (status, text), f"{method} {path} tells ids apart"
    # What bob sees names nothing of alice's.
    for url in ("/api/v1/desktops", "/api/v1/pools", "/api/v1/me"):
        answer = bob.get(url)
        assert answer.status_code == 200
        assert a_id not in answer.text and a_name not in answer.text and "alice" not in \
            answer.text, f"{url}: {answer.text}"
    assert [d["id"] for d in bob.get("/api/v1/desktops").json()] == [his["desktop_id"]]
    assert [p["mine"] for p in bob.get("/api/v1/pools").json()] == [his["desktop"]]
    # Alice's desktop is still hers, untouched, and her own routes still work.
    assert desktop_row(world, a_id) == ("reserved", "alice")
    alice = world.client("alice")
    assert alice.post(f"/api/v1/desktops/{a_id}/console").status_code == 200
    assert alice.post(f"/api/v1/desktops/{a_id}/logoff").json()["state"] == "recycling"


def test_a_full_pool_refuses_another_user_rather_than_share_a_desktop(
        world: BrokerWorld) -> None:
    world.pool("solo", spare=1, max_size=1)
    world.user("carol", entitled_to=("solo",))
    world.user("dave", entitled_to=("solo",))
    world.fill()
    hers = connect(world, "carol", "solo")["desktop_id"]
    refused = world.client("dave").post("/api/v1/pools/solo/connect")
    assert refused.status_code == 503 and "exhausted" in refused.json()["detail"]
    assert desktop_row(world, hers) == ("reserved", "carol")
    assert world.client("dave").get("/api/v1/desktops").json() == []


# --- (c) console tickets -----------------------------------------------------------------------


def test_a_console_ticket_opens_once(world: BrokerWorld) -> None:
    desktop = connect(world, "alice")["desktop_id"]
    ticket = world.client("alice").post(f"/api/v1/desktops/{desktop}/console").json()
    tickets = ConsoleTickets(world.ctx)
    target = tickets.consume(ticket["token"])
    assert (str(target.desktop_id), target.user) == (desktop, "alice")
    with pytest.raises(AuthenticationFailed):
        tickets.consume(ticket["token"])
    with pytest.raises(AuthenticationFailed):
        tickets.consume("made-up-" + uuid.uuid4().hex)


def test_an_expired_console_ticket_opens_nothing(world: BrokerWorld) -> None:
    desktop = uuid.UUID(connect(world, "alice")["desktop_id"])
    alice = AccountService(world.ctx).resolve(world.tokens["alice"])
    ticket = ConsoleTickets(world.ctx, ttl=timedelta(seconds=-1)).issue(alice, desktop)
    with pytest.raises(AuthenticationFailed):
        ConsoleTickets(world.ctx).consume(ticket.token)


def test_a_console_ticket_dies_with_the_session_it_was_issued_in(world: BrokerWorld) -> None:
    alice = world.client("alice")
    first = connect(world, "alice")
    url = f"/api/v1/desktops/{first['desktop_id']}/console"
    ticket, kept = (alice.post(url).json()["token"] for _ in range(2))
    assert alice.post(f"/api/v1/desktops/{first['desktop_id']}/logoff").status_code == 200
    tickets = ConsoleTickets(world.ctx)
    with pytest.raises(AuthenticationFailed):
        tickets.consume(ticket)  # logged off: the desktop is recycling
    # Even once the same desktop is back and hers again in a new session, a ticket of the
    # old one (never tried, not yet expired) stays dead: a ticket belongs to one session.
    world.fill()
    again = connect(world, "alice")
    assert again["desktop_id"] == first["desktop_id"]  # the first free one by name
    with pytest.raises(AuthenticationFailed):
        tickets.consume(kept)
    fresh = alice.post(f"/api/v1/desktops/{again['desktop_id']}/console").json()["token"]
    assert tickets.consume(fresh).user == "alice"


def test_a_console_ticket_is_worthless_once_the_desktop_is_someone_elses(
        world: BrokerWorld) -> None:
    world.pool("solo", spare=1, max_size=1)
    world.user("carol", entitled_to=("solo",))
    world.user("dave", entitled_to=("solo",))
    world.fill()
    desktop = connect(world, "carol", "solo")["desktop_id"]
    carol = world.client("carol")
    ticket = carol.post(f"/api/v1/desktops/{desktop}/console").json()["token"]  # never tried
    assert carol.post(f"/api/v1/desktops/{desktop}/logoff").status_code == 200
    world.fill()
    assert connect(world, "dave", "solo")["desktop_id"] == desktop
    with pytest.raises(AuthenticationFailed):
        ConsoleTickets(world.ctx).consume(ticket)


# --- (d) signing out ---------------------------------------------------------------------------


def test_signing_out_revokes_the_session_token(world: BrokerWorld) -> None:
    browser = world.client()
    token = browser.post("/api/v1/auth/login", json={"username": "alice",
                                                     "password": PASSWORD}).json()["token"]
    other = world.client().post("/api/v1/auth/login", json={"username": "alice",
                                                             "password": PASSWORD})
    other_token = other.json()["token"]
    bearer = TestClient(browser.app, headers={"authorization": f"Bearer {token}"})
    assert bearer.get("/api/v1/me").json()["name"] == "alice"
    assert browser.get("/api/v1/me").status_code == 200  # the cookie
    out = bearer.post("/api/v1/auth/logout")
    assert out.status_code == 204
    assert "deskpool_session=" in out.headers.get("set-cookie", "")  # the cookie is cleared
    for client in (bearer, TestClient(browser.app, cookies={"deskpool_session": token},
                                      headers={"origin": "http://testserver"})):
        assert client.get("/api/v1/me").status_code == 401
        assert client.post("/api/v1/pools/lab/connect").status_code == 401
    with pytest.raises(AuthenticationFailed):
        AccountService(world.ctx).resolve(token)
    # Only that session ends: alice's other session and her API token still work.
    assert TestClient(browser.app, headers={"authorization": f"Bearer {other_token}"}).get(
        "/api/v1/me").status_code == 200
    assert world.client("alice").get("/api/v1/me").status_code == 200


def test_signing_out_through_the_cookie_revokes_it(world: BrokerWorld) -> None:
    browser = world.client()
    token = browser.post("/api/v1/auth/login", json={"username": "bob",
                                                     "password": PASSWORD}).json()["token"]
    assert browser.post("/api/v1/auth/logout").status_code == 204
    assert browser.get("/api/v1/me").status_code == 401
    replay = TestClient(browser.app, cookies={"deskpool_session": token})
    assert replay.get("/api/v1/me").status_code == 401
