"""The OpenAPI document types every enum the admin listings and the user's routes answer (a
client learns each value a host's, desktop's or pool's state can take), and the API obeys no
body its own schema calls invalid: ``true`` is not a number, ``1`` or ``"yes"`` not a flag,
``"5"`` not a count (an integral ``5.0`` is one, as JSON Schema says). Before, pydantic's
lax reading took ``cpu_overcommit: true`` as 1.0 and ``is_admin: 1`` as an administrator
(found by schemathesis on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskpool.domain.models import HostState, PowerState
from deskpool.domain.states import DesktopState
from tests.broker_world import BrokerWorld, lab_world


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    with lab_world(tmp_path) as w:
        yield w


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while True:
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        elif "anyOf" in schema:  # X | None: the X
            schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
        else:
            return schema


def _answer_item(doc: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    responses = doc["paths"][path][method]["responses"]
    ok = next(responses[c] for c in ("200", "201", "202") if c in responses)
    schema = _resolve(doc, ok["content"]["application/json"]["schema"])
    if schema.get("type") == "array":
        schema = _resolve(doc, schema["items"])
    return schema


ENUM_FIELDS = {
    ("/api/v1/admin/hosts", "get"): {"state": set(HostState), "domain_type": None},
    ("/api/v1/admin/hosts", "post"): {"state": set(HostState)},
    ("/api/v1/admin/hosts/{name}/drain", "post"): {"state": set(HostState)},
    ("/api/v1/admin/desktops", "get"): {"state": set(DesktopState),
                                        "power_state": set(PowerState), "task": None},
    ("/api/v1/admin/sessions", "get"): {"state": set(DesktopState)},
    ("/api/v1/admin/pools", "get"): {"kind": None, "assignment": None, "clone_mode": None,
                                     "status": None},
    ("/api/v1/admin/pools", "post"): {"status": None},
    ("/api/v1/admin/templates", "get"): {"customization": None},
    ("/api/v1/admin/entitlements", "get"): {"kind": {"user", "group"}},
    ("/api/v1/admin/users/{name}/tokens", "get"): {"kind": {"api", "session"}},
    ("/api/v1/desktops", "get"): {"state": set(DesktopState)},
    ("/api/v1/messages", "get"): {"severity": {"info", "warning", "error"}},
    ("/api/v1/desktops/{desktop_id}/logoff", "post"): {"state": set(DesktopState)},
}


def test_every_enum_an_answer_carries_is_typed_in_the_document(world: BrokerWorld) -> None:
    doc = world.client().get("/openapi.json").json()
    untyped = []
    for (path, method), fields in ENUM_FIELDS.items():
        item = _answer_item(doc, path, method)
        for name, values in fields.items():
            field = _resolve(doc, item["properties"][name])
            if "enum" not in field:
                untyped.append(f"{method.upper()} {path}: {name} is {field}")
            elif values is not None:
                assert set(field["enum"]) == {str(v) for v in values}, (path, name)
    assert not untyped, "\n".join(untyped)


def test_every_bound_is_in_the_document_as_json_schema_says_it(world: BrokerWorld) -> None:
    """minimum/maximum, never pydantic's own ge/le (which a client and schemathesis ignore,
    so the API would refuse values its document allows)."""
    doc = world.client().get("/openapi.json").json()
    stray: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            stray.extend(f"{where}.{k}" for k in ("ge", "le", "gt", "lt") if k in node
                         and isinstance(node[k], int | float))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(doc["components"], "components")
    assert not stray, stray
    host = doc["components"]["schemas"]["HostCreate"]["properties"]
    assert host["max_desktops"]["anyOf"][0]["maximum"] == 100_000


def test_the_listings_answer_values_of_those_enums(world: BrokerWorld) -> None:
    admin = world.client("root")
    hosts = admin.get("/api/v1/admin/hosts").json()
    assert [h["state"] for h in hosts] == ["enabled"]
    desktops = admin.get("/api/v1/admin/desktops").json()
    assert desktops and {d["state"] for d in desktops} <= set(DesktopState)
    assert {d["power_state"] for d in desktops} <= set(PowerState)
    pools = admin.get("/api/v1/admin/pools").json()
    # The page's table reads these; the typed answer keeps every one of them.
    assert {"name", "status", "counts", "previous_version", "session_start_timeout_s",
            "roaming_profiles"} <= set(pools[0])
    assert admin.get("/api/v1/admin/entitlements").json() == [
        {"pool": "lab", "kind": "user", "principal": "alice"}]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/v1/admin/hosts", {"name": "h9", "uri": "fake://h9", "cpu_overcommit": True},
     "cpu_overcommit"),
    ("/api/v1/admin/hosts", {"name": "h9", "uri": "fake://h9", "max_provisioning": "3"},
     "max_provisioning"),
    ("/api/v1/admin/users", {"name": "mallory", "password": "long-enough-1", "is_admin": 1},
     "is_admin"),
    ("/api/v1/admin/users", {"name": "mallory", "password": "long-enough-1",
                             "is_admin": "yes"}, "is_admin"),
    ("/api/v1/admin/pools", {"name": "lab2", "template": "golden", "spare": "2"}, "spare"),
    ("/api/v1/admin/pools", {"name": "lab2", "template": "golden", "one_time": 0},
     "one_time"),
    ("/api/v1/admin/pools/lab/resize", {"max_size": "3"}, "max_size"),
    ("/api/v1/admin/pools/lab/resize", {"max_size": 3.5}, "max_size"),
    ("/api/v1/admin/hosts/h1/drain", {"grace_s": False}, "grace_s"),
    ("/api/v1/auth/tokens", {"label": "x", "expires_in_days": True}, "expires_in_days"),
])
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(
        world: BrokerWorld, path: str, body: dict[str, Any], field: str) -> None:
    audited = len(world.client("root").get("/api/v1/admin/audit").json())
    answer = world.client("root").post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"], answer.text  # one sentence naming it
    admin = world.client("root")
    assert [h["name"] for h in admin.get("/api/v1/admin/hosts").json()] == ["h1"]
    assert "mallory" not in {u["name"] for u in admin.get("/api/v1/admin/users").json()}
    assert [p["name"] for p in admin.get("/api/v1/admin/pools").json()] == ["lab"]
    assert len(admin.get("/api/v1/admin/audit").json()) == audited  # nothing was done


def test_numbers_of_the_right_type_still_go_through(world: BrokerWorld) -> None:
    admin = world.client("root")
    host = admin.post("/api/v1/admin/hosts", json={"name": "h9", "uri": "fake://h9",
                                                   "cpu_overcommit": 2, "max_desktops": 5})
    assert host.status_code == 200, host.text
    assert host.json()["cpu_overcommit"] == 2.0
    user = admin.post("/api/v1/admin/users", json={"name": "carol", "password": "long-enough-1",
                                                   "is_admin": False})
    assert user.status_code == 200, user.text
    # An integral 30.0 is an integer as JSON Schema has it (schemathesis sends such values).
    token = admin.post("/api/v1/auth/tokens", json={"expires_in_days": 30.0})
    assert token.status_code == 200, token.text
    resized = admin.post("/api/v1/admin/pools/lab/resize", json={"max_size": 3.0})
    assert resized.status_code == 200 and resized.json()["max_size"] == 3, resized.text
