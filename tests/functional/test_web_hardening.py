"""The web server's own defences, on the fake driver: every state-changing request made with
the session cookie must come from the portal's own origin (bearer tokens and cookie-less
requests are exempt), and every response carries the security headers, HSTS only over TLS."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deskpool.drivers.registry import forget_fake_hosts
from tests.broker_world import PASSWORD, BrokerWorld, lab_world, make_world
from tests.functional.test_api_security import api_routes, url_of

ORIGIN = "http://testserver"  # TestClient's own: scheme and Host of its requests
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    with lab_world(tmp_path) as w:
        yield w


def cookie_client(world: BrokerWorld, user: str, **headers: str) -> TestClient:
    """A browser signed in as ``user`` (its session cookie), sending ``headers``."""
    signing_in = world.client()  # sends the portal's own Origin
    answer = signing_in.post("/api/v1/auth/login", json={"username": user,
                                                         "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    return TestClient(signing_in.app, cookies={"deskpool_session": answer.json()["token"]},
                      headers=headers)


def test_every_state_changing_route_refuses_a_cookie_from_another_site(
        world: BrokerWorld) -> None:
    routes = [r for r in api_routes(world) if r[0] in STATE_CHANGING]
    assert len(routes) >= 20 and {m for m, _, _ in routes} >= {"POST", "PATCH", "DELETE"}
    values = {"pool": "lab", "name": "lab", "kind": "user", "principal": "alice"}
    forged = {
        "a foreign Origin": {"origin": "https://evil.example"},
        "a foreign Referer": {"referer": "https://evil.example/page"},
        "Origin null": {"origin": "null"},
        "the same host on another port": {"origin": "http://testserver:8080"},
        "the same host over https": {"origin": "https://testserver"},
        "no Origin nor Referer": {},
        "a foreign Origin despite our Referer": {"origin": "https://evil.example",
                                                 "referer": ORIGIN + "/"},
    }
    failures = []
    for label, headers in forged.items():
        client = cookie_client(world, "root", **headers)
        for method, path, route in routes:
            answer = client.request(method, url_of(route, values))
            detail = answer.json().get("detail", "") if answer.status_code == 403 else ""
            if not detail.startswith("refused:"):
                failures.append(f"{label}: {method} {path}: {answer.status_code} "
                                f"{answer.text[:100]}")
    assert not failures, "\n".join(failures)
    # Nothing happened: the pool is there, enabled, and alice's tokens still work.
    pool = cookie_client(world, "root").get("/api/v1/admin/pools/lab").json()
    assert pool["status"] == "enabled"
    assert world.client("alice").get("/api/v1/me").status_code == 200
    # The refusal says why.
    refused = cookie_client(world, "alice", origin="https://evil.example").post(
        "/api/v1/pools/lab/connect")
    assert "another site's page" in refused.json()["detail"]
    assert "evil.example" in refused.json()["detail"]
    silent = cookie_client(world, "alice").post("/api/v1/pools/lab/connect")
    assert "neither" in silent.json()["detail"]


def test_the_portals_own_pages_bearer_tokens_and_reads_pass(world: BrokerWorld) -> None:
    for headers in ({"origin": ORIGIN}, {"referer": ORIGIN + "/admin"},
                    {"origin": "HTTP://TESTSERVER:80"}):
        client = cookie_client(world, "alice", **headers)
        answer = client.post("/api/v1/pools/lab/connect")
        assert answer.status_code == 200, (headers, answer.text)
        desktop = answer.json()["desktop_id"]
        assert client.post(f"/api/v1/desktops/{desktop}/logoff").status_code == 200
        world.fill()
    # Reads need no Origin; a bearer token needs none (a script sends it on purpose), even
    # with a foreign Origin; and neither does a request without the cookie (nothing to abuse).
    foreign = cookie_client(world, "alice", origin="https://evil.example")
    assert foreign.get("/api/v1/desktops").status_code == 200
    token = TestClient(foreign.app, headers={"authorization": f"Bearer {world.tokens['alice']}",
                                             "origin": "https://evil.example"})
    assert token.post("/api/v1/pools/lab/connect").status_code == 200
    assert TestClient(foreign.app).post("/api/v1/pools/lab/connect").status_code == 401
    # Signing out with the cookie, from the portal: fine.
    assert cookie_client(world, "alice", origin=ORIGIN).post(
        "/api/v1/auth/logout").status_code == 204


def test_another_site_cannot_sign_a_visitor_in(world: BrokerWorld) -> None:
    login = {"username": "alice", "password": PASSWORD}
    app = world.client().app
    refused = TestClient(app, headers={"origin": "https://evil.example"}).post(
        "/api/v1/auth/login", json=login)
    assert refused.status_code == 403 and "set-cookie" not in refused.headers
    # A script without any Origin (curl, the CLI) and the portal itself sign in.
    assert TestClient(app).post("/api/v1/auth/login", json=login).status_code == 200
    assert world.client().post("/api/v1/auth/login", json=login).status_code == 200


def test_an_allowed_portal_name_passes(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        world.ctx.settings.console_allowed_origins = ["vdi.example.com"]
        world.pool("lab")
        world.user("alice", entitled_to=("lab",))
        world.fill()
        client = cookie_client(world, "alice", origin="https://vdi.example.com")
        assert client.post("/api/v1/pools/lab/connect").status_code == 200
        other = cookie_client(world, "alice", origin="https://evil.example.com")
        assert other.post("/api/v1/pools/lab/connect").status_code == 403
    finally:
        world.ctx.close()
        forget_fake_hosts()


COMMON = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
          "referrer-policy": "same-origin"}


def test_every_response_carries_the_security_headers(world: BrokerWorld) -> None:
    client = world.client()
    answers = {
        "portal": client.get("/"), "admin page": client.get("/admin"),
        "console page": client.get("/console/00000000-0000-0000-0000-000000000000"),
        "script": client.get("/static/portal.js"), "api": client.get("/api/v1/pools"),
        "api error": client.get("/api/v1/admin/pools/nope"), "health": client.get("/healthz"),
        "metrics": client.get("/metrics"), "openapi": client.get("/openapi.json"),
        "missing": client.get("/no/such/page"),
        "csrf refusal": cookie_client(world, "alice").post("/api/v1/pools/lab/connect"),
    }
    for what, answer in answers.items():
        for name, value in COMMON.items():
            assert answer.headers.get(name) == value, (what, name, answer.headers)
        policy = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy, (what, policy)
        assert "strict-transport-security" not in answer.headers, what  # plain http
    for page in ("portal", "admin page", "console page"):
        policy = answers[page].headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    for data in ("api", "api error", "metrics", "openapi"):
        assert answers[data].headers["content-security-policy"].startswith("default-src 'none'")
    assert answers["api"].headers["cache-control"] == "no-store"
    # The pages really have no inline script for the policy to block, nor inline handlers.
    for page in ("portal", "admin page", "console page"):
        html = answers[page].text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
        assert not re.search(r"\son[a-z]+=", html), page


def test_the_api_documents_allow_their_own_inline_script_only(world: BrokerWorld) -> None:
    docs = world.client().get("/docs")
    assert docs.status_code == 200
    policy = docs.headers["content-security-policy"]
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy
    script_src = re.search(r"script-src ([^;]*)", policy)
    assert script_src is not None and "unsafe" not in script_src.group(1)


def test_hsts_only_over_tls(world: BrokerWorld) -> None:
    secure = TestClient(world.client().app, base_url="https://testserver")
    for path in ("/", "/api/v1/pools", "/healthz"):
        assert secure.get(path).headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in world.client().get("/").headers


def test_an_unhandled_error_is_a_logged_json_500_with_the_usual_headers(
        world: BrokerWorld, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a route: the caller gets the error body every other error has, the security
    headers and a request id; the log has the exception, the answer does not."""
    def broken(*_args: object) -> None:
        raise RuntimeError("secret internals: a bug")

    monkeypatch.setattr("deskpool.api.routes_user.user_public", broken)
    with caplog.at_level(logging.ERROR, logger="deskpool.api.server_errors"):
        answer = world.client("alice").get("/api/v1/me")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["detail"].startswith("internal error")
    assert "secret" not in answer.text
    assert answer.headers["x-content-type-options"] == "nosniff"
    request_id = answer.headers["x-request-id"]
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "secret internals" in caplog.text and record.exc_info is not None
    assert getattr(record, "request_id", request_id) == request_id
