"""The OpenAPI document says what the API really does, on the fake driver: it declares the
bearer token and the session cookie, each operation that needs a caller names them, and every
error an operation answers to a battery of callers and inputs (none, a user, an administrator;
existing, missing and malformed names; empty and wrong bodies; a cookie from another site) is a
status its document lists, with the body it documents. /metrics and /readyz answer 503 with a
clear body when the database does not."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deskpool.config import Settings
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.context import ServiceContext
from tests.broker_world import PASSWORD, BrokerWorld, lab_world, make_world
from tests.functional.test_api_security import api_routes, url_of


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    with lab_world(tmp_path) as w:
        yield w


def document(world: BrokerWorld) -> dict[str, Any]:
    answer = world.client().get("/openapi.json")
    assert answer.status_code == 200
    found: dict[str, Any] = answer.json()
    return found


def test_the_document_declares_how_to_authenticate(world: BrokerWorld) -> None:
    doc = document(world)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerToken"] == {**schemes["bearerToken"], "type": "http",
                                      "scheme": "bearer"}
    assert schemes["sessionCookie"]["in"] == "cookie"
    assert schemes["sessionCookie"]["name"] == "deskpool_session"
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if not path.startswith("/api/v1/"):
                continue
            if (method, path) == ("post", "/api/v1/auth/login"):
                assert "security" not in op and "401" in op["responses"]
                continue
            assert op.get("security") == [{"bearerToken": []}, {"sessionCookie": []}], (
                method, path)
            assert "401" in op["responses"], (method, path)
    login = doc["paths"]["/api/v1/auth/login"]["post"]["responses"]
    assert "Retry-After" in login["429"]["headers"]
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    token = doc["paths"]["/api/v1/auth/tokens"]["post"]
    assert token["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}


def test_every_error_answered_is_documented_with_its_body(world: BrokerWorld) -> None:
    doc = document(world)
    app = world.client().app
    desktop = world.client("alice").post("/api/v1/pools/lab/connect").json()["desktop_id"]
    foreign = TestClient(app, headers={"origin": "https://evil.example"})
    foreign.cookies.set("deskpool_session", world.client().post(
        "/api/v1/auth/login", json={"username": "root", "password": PASSWORD}).json()["token"])
    callers = {"anonymous": world.client(), "a user": world.client("alice"),
               "another site's page": foreign}
    values = {
        "missing": {"pool": "nope", "name": "nope", "desktop_id": str(uuid.uuid4()),
                    "kind": "user", "principal": "nobody", "number": "99",
                    "token_id": str(uuid.uuid4()), "user_name": "nobody"},
        "malformed": {"pool": "NOT VALID!", "name": "NOT VALID!", "desktop_id": "nope",
                      "kind": "robot", "principal": "!", "number": "x", "token_id": "x",
                      "user_name": "!"},
        "existing": {"pool": "lab", "name": "lab", "desktop_id": desktop, "kind": "user",
                     "principal": "alice", "number": "1", "user_name": "alice",
                     "token_id": str(uuid.uuid4())},
    }
    bodies: list[Any] = [None, {}, {"unexpected": ["x"] * 3}, [], "text"]
    seen: set[int] = set()
    failures = []

    def check(method: str, path: str, answer: Any, how: str) -> None:
        seen.add(answer.status_code)
        documented = doc["paths"][path][method.lower()]["responses"]
        if answer.status_code >= 500 and answer.status_code not in (502, 503):
            failures.append(f"{how}: {method} {path}: server error {answer.text[:100]}")
        elif str(answer.status_code) not in documented:
            failures.append(f"{how}: {method} {path}: {answer.status_code} undocumented "
                            f"({sorted(documented)}): {answer.text[:100]}")
        elif answer.status_code >= 400:
            body = answer.json()
            if not (isinstance(body, dict) and isinstance(body.get("detail"), str)):
                failures.append(f"{how}: {method} {path}: body {answer.text[:100]}")

    # Signing out last: it ends the caller's token.
    routes = sorted(api_routes(world), key=lambda r: r[1] == "/api/v1/auth/logout")
    for name, client in callers.items():
        for method, path, route in routes:
            check(method, path, client.request(method, url_of(route, values["existing"])), name)
    admin = world.client("root")
    for _ in range(2):  # the second one conflicts
        check("POST", "/api/v1/admin/groups",
              admin.post("/api/v1/admin/groups", json={"name": "staff"}), "a group twice")
    for label in ("missing", "malformed", "existing"):
        for method, path, route in routes:
            url = url_of(route, values[label])
            for body in bodies if method in ("POST", "PUT", "PATCH") else [None]:
                answer = (admin.request(method, url) if body is None
                          else admin.request(method, url, json=body))
                check(method, path, answer, f"an admin, {label} names, body {body!r}")
    assert not failures, "\n".join(failures)
    assert {400, 401, 403, 404, 409, 422} <= seen, seen


def test_a_locked_sign_in_is_a_documented_429_with_retry_after(world: BrokerWorld) -> None:
    client = world.client()
    for _ in range(world.ctx.settings.signin_user_max_failures):
        client.post("/api/v1/auth/login", json={"username": "alice", "password": "wrong"})
    locked = client.post("/api/v1/auth/login", json={"username": "alice",
                                                     "password": PASSWORD})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "try again in" in locked.json()["detail"]


def test_metrics_and_readiness_answer_503_when_the_database_does_not(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        client = world.client()
        assert client.get("/metrics").status_code == 200
        gone = ServiceContext(Settings(data_dir=tmp_path / "gone",
                                       database_url=f"sqlite:///{tmp_path / 'x.db'}"))
        client.app.state.services.ctx = gone  # type: ignore[attr-defined]
        client.app.state.metrics_registry = __import__(  # type: ignore[attr-defined]
            "deskpool.api.metrics", fromlist=["registry_for"]).registry_for(gone)
        (tmp_path / "x.db").unlink()
        (tmp_path / "x.db").mkdir()  # a directory where the database file was
        gone.session_factory.kw["bind"].dispose()
        for path in ("/metrics", "/readyz"):
            answer = client.get(path)
            assert answer.status_code == 503, (path, answer.text)
            assert "the database does not answer" in answer.json()["detail"]
        assert client.get("/metrics").headers["retry-after"] == "10"
        assert client.get("/healthz").status_code == 200  # the process itself is alive
    finally:
        world.ctx.close()
        forget_fake_hosts()


def test_a_wrong_method_is_told_every_method_the_path_answers(world: BrokerWorld) -> None:
    # GET and DELETE of a user come from two routers; GET and POST of tokens from two routes.
    for path, methods in (("/api/v1/admin/users/alice", "DELETE, GET"),
                          ("/api/v1/auth/tokens", "GET, POST")):
        answer = world.client("root").request("PUT", path)
        assert answer.status_code == 405
        assert answer.headers["allow"] == methods
