"""The admin surface over HTTP on the fake driver: pools changed, resized, disabled and
deleted (drained first), hosts removed only when empty, template versions published and
deleted only when unused, rollout and rollback, users and groups, entitlements revoked; and
the audit trail each of these leaves (who, from where, old and new values)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskpool.domain.pools import Assignment, OnLogout
from deskpool.domain.states import DesktopState
from deskpool.services.audit import audit_log
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService
from tests.broker_world import PASSWORD, BrokerWorld, lab_world

ADMIN = "/api/v1/admin"


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    with lab_world(tmp_path, database_url) as w:
        yield w


def audit_of(world: BrokerWorld, target: str) -> list[Any]:
    return audit_log(world.ctx, target=target)


def lab_desktops(world: BrokerWorld) -> dict[str, str]:
    return {d.name: d.state for d in DesktopService(world.ctx).list() if d.name.startswith("lab")}


# --- pools -----------------------------------------------------------------------------------

def test_patch_changes_any_setting_and_audits_old_and_new_values(world: BrokerWorld) -> None:
    admin = world.client("root")
    answer = admin.patch(f"{ADMIN}/pools/lab", json={
        "power_policy": "suspend", "idle_timeout_s": 600, "on_logout": "retire",
        "max_size": 6, "naming_pattern": "lab-{n:03}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["max_size"] == 6
    entry = audit_of(world, "pool/lab")[0]
    assert entry.action == "pool.update" and entry.actor == "root"
    assert entry.address == "testclient"  # the caller's address, from the connection
    assert entry.old == {"power_policy": "running", "idle_timeout_s": None,
                         "on_logout": "recycle-revert", "max_size": 4,
                         "naming_pattern": "lab-{n:02}"}
    assert entry.new["power_policy"] == "suspend" and entry.new["idle_timeout_s"] == 600
    # A setting may be cleared (null), others not; unknown fields and bad enums are refused.
    assert admin.patch(f"{ADMIN}/pools/lab", json={"idle_timeout_s": None}).status_code == 200
    refused = admin.patch(f"{ADMIN}/pools/lab", json={"spare": None})
    assert refused.status_code == 422 and "spare cannot be null" in refused.json()["detail"]
    bad = admin.patch(f"{ADMIN}/pools/lab", json={"power_policy": "hibernate"})
    assert bad.status_code == 422 and "power_policy" in bad.json()["detail"]
    assert admin.patch(f"{ADMIN}/pools/lab", json={"colour": "red"}).status_code == 422
    # The pool is unchanged by refused requests.
    assert PoolService(world.ctx).get("lab").spare == 2


def test_patch_refuses_what_would_change_existing_desktops(world: BrokerWorld) -> None:
    admin = world.client("root")
    answer = admin.patch(f"{ADMIN}/pools/lab", json={"kind": "stateful",
                                                     "on_logout": "recycle-as-is"})
    assert answer.status_code == 409
    assert "has desktops, so its kind cannot change" in answer.json()["detail"]
    invalid = admin.patch(f"{ADMIN}/pools/lab", json={"spare": 9})  # above max 4
    assert invalid.status_code == 400 and "spare (9) is above max (4)" in invalid.json()["detail"]


def test_resize_disable_and_enable(world: BrokerWorld) -> None:
    admin = world.client("root")
    resized = admin.post(f"{ADMIN}/pools/lab/resize", json={"spare": 1, "max_size": 3})
    assert resized.status_code == 200 and resized.json()["spare"] == 1
    assert admin.post(f"{ADMIN}/pools/lab/disable").json()["status"] == "disabled"
    refused = world.client("alice").post("/api/v1/pools/lab/connect")
    assert refused.status_code == 403
    assert "disabled by the administrator" in refused.json()["detail"]
    assert admin.post(f"{ADMIN}/pools/lab/enable").json()["status"] == "enabled"
    assert world.client("alice").post("/api/v1/pools/lab/connect").json()["status"] == "ready"
    actions = [e.action for e in audit_of(world, "pool/lab")]
    assert actions[:3] == ["pool.enable", "pool.disable", "pool.update"]


def test_deleting_a_pool_drains_it_without_taking_desktops_from_users(
        world: BrokerWorld) -> None:
    alice = world.client("alice")
    held = alice.post("/api/v1/pools/lab/connect").json()
    admin = world.client("root")
    answer = admin.delete(f"{ADMIN}/pools/lab")
    assert answer.status_code == 202 and answer.json()["status"] == "deleting"
    assert admin.delete(f"{ADMIN}/pools/lab").status_code == 409  # already being deleted
    assert admin.patch(f"{ADMIN}/pools/lab", json={"spare": 1}).status_code == 409
    world.fill(passes=2)
    # Free desktops are gone; the one alice holds is still hers and she can reconnect.
    assert lab_desktops(world) == {held["desktop"]: "reserved"}
    again = alice.post("/api/v1/pools/lab/connect").json()
    assert again["reconnect"] and again["desktop"] == held["desktop"]
    logoff = alice.post(f"/api/v1/desktops/{held['desktop_id']}/logoff")
    assert logoff.status_code == 200 and logoff.json()["state"] == DesktopState.RETIRING
    world.fill(passes=2)
    assert lab_desktops(world) == {}
    assert [p.name for p in PoolService(world.ctx).list()] == []
    assert admin.get(f"{ADMIN}/pools/lab").status_code == 404
    assert audit_of(world, "pool/lab")[0].new == {"status": "deleting"}


def test_deleting_a_dedicated_pool_retires_desktops_kept_ready_for_their_users(
        world: BrokerWorld) -> None:
    world.pool("desk", assignment=Assignment.DEDICATED, on_logout=OnLogout.RECYCLE_AS_IS,
               spare=1)
    admin = world.client("root")
    admin.post(f"{ADMIN}/pools/desk/entitlements", json={"kind": "user", "principal": "alice"})
    world.fill()
    alice = world.client("alice")
    mine = alice.post("/api/v1/pools/desk/connect").json()
    # Logged off (by the administrator: audited too), the desktop stays hers, ready.
    forced = admin.post(f"{ADMIN}/desktops/{mine['desktop_id']}/logoff")
    assert forced.status_code == 200
    assert audit_of(world, f"desktop/{mine['desktop_id']}")[0].action == "desktop.logoff"
    world.fill()
    assert {d.name: d.state for d in DesktopService(world.ctx).list()}[mine["desktop"]] == \
        DesktopState.READY
    assert admin.delete(f"{ADMIN}/pools/desk").status_code == 202
    world.fill(passes=3)
    assert "desk" not in [p.name for p in PoolService(world.ctx).list()]
    assert not [d for d in DesktopService(world.ctx).list() if d.name.startswith("desk")]


# --- hosts, templates, rollout ---------------------------------------------------------------

def test_a_host_with_desktops_is_not_removed_and_an_empty_one_is(world: BrokerWorld) -> None:
    admin = world.client("root")
    refused = admin.delete(f"{ADMIN}/hosts/h1")
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "host 'h1' still has 2 desktop(s) (lab-01, lab-02)" in detail and "drain" in detail
    assert admin.post(f"{ADMIN}/hosts", json={"name": "spare-host",
                                               "uri": "fake://spare"}).status_code == 200
    assert admin.delete(f"{ADMIN}/hosts/spare-host").status_code == 204
    assert [h["name"] for h in admin.get(f"{ADMIN}/hosts").json()] == ["h1"]
    assert admin.delete(f"{ADMIN}/hosts/spare-host").status_code == 404
    entry = audit_of(world, "host/spare-host")[0]
    assert entry.action == "host.remove" and entry.old["uri"] == "fake://spare"


def test_publish_rollout_canary_rollback_and_version_deletes(world: BrokerWorld,
                                                             tmp_path: Path) -> None:
    admin = world.client("root")
    disk = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    published = admin.post(f"{ADMIN}/templates/golden/versions", json={"image": str(disk)})
    assert published.status_code == 200, published.text
    assert published.json()["number"] == 2
    rolled = admin.post(f"{ADMIN}/pools/lab/rollout", json={"version": 2, "canary": 1})
    assert rolled.status_code == 200 and rolled.json()["version"] == 2
    assert rolled.json()["previous_version"] == 1
    # Version 1 is the pool's previous version and its desktops' version: refused.
    in_use = admin.delete(f"{ADMIN}/templates/golden/versions/1")
    assert in_use.status_code == 409
    assert "pool lab (previous version)" in in_use.json()["detail"]
    assert "desktop(s): lab-01" in in_use.json()["detail"]
    back = admin.post(f"{ADMIN}/pools/lab/rollback")
    assert back.json()["version"] == 1 and back.json()["previous_version"] == 2
    assert admin.delete(f"{ADMIN}/templates/golden/versions/2").status_code == 409
    # Roll forward again, let the reconciler replace the desktops: version 1 is then free
    # of desktops but still the pool's previous version.
    admin.post(f"{ADMIN}/pools/lab/rollout", json={"version": 2})
    world.fill(passes=4)
    still = admin.delete(f"{ADMIN}/templates/golden/versions/1")
    assert still.status_code == 409 and "desktop(s)" not in still.json()["detail"]
    actions = [e.action for e in audit_of(world, "pool/lab")]
    assert actions[:3] == ["pool.rollout", "pool.rollback", "pool.rollout"]
    first = audit_of(world, "pool/lab")[2]
    assert first.old == {"version": 1, "canary": 0} and first.new == {"version": 2,
                                                                       "canary": 1}
    # A third version nothing uses is deleted, with its files.
    published3 = admin.post(f"{ADMIN}/templates/golden/versions", json={"image": str(disk)})
    path = Path(published3.json()["image_path"])
    assert path.exists()
    assert admin.delete(f"{ADMIN}/templates/golden/versions/3").status_code == 204
    assert not path.exists()
    numbers = [t["number"] for t in admin.get(f"{ADMIN}/templates").json()]
    assert numbers == [1, 2]
    assert audit_of(world, "template/golden")[0].action == "template.delete-version"


# --- users, groups, entitlements -------------------------------------------------------------

def test_a_disabled_user_cannot_sign_in_and_their_tokens_stop_working(
        world: BrokerWorld) -> None:
    admin = world.client("root")
    alice = world.client("alice")
    assert alice.get("/api/v1/me").status_code == 200
    answer = admin.post(f"{ADMIN}/users/alice/disable")
    assert answer.status_code == 200 and answer.json()["disabled"] is True
    assert alice.get("/api/v1/me").status_code == 401
    login = world.client().post("/api/v1/auth/login", json={"username": "alice",
                                                             "password": PASSWORD})
    assert login.status_code == 401 and "disabled" in login.json()["detail"]
    # Enabling lets her sign in again; the revoked token stays revoked.
    assert admin.post(f"{ADMIN}/users/alice/enable").json()["disabled"] is False
    assert world.client().post("/api/v1/auth/login", json={
        "username": "alice", "password": PASSWORD}).status_code == 200
    assert alice.get("/api/v1/me").status_code == 401
    entry = audit_of(world, "user/alice")[1]
    assert entry.action == "user.disable" and entry.old == {"disabled": False}
    assert admin.post(f"{ADMIN}/users/root/disable").status_code == 409  # not oneself


def test_reset_password_create_and_delete_users_and_groups(world: BrokerWorld) -> None:
    admin = world.client("root")
    created = admin.post(f"{ADMIN}/users", json={"name": "Carol", "password": "long-enough-1",
                                                  "groups": ["Staff"]})
    assert created.status_code == 200 and created.json()["groups"] == ["staff"]
    reset = admin.post(f"{ADMIN}/users/carol/password").json()
    assert reset["user"] == "carol" and len(reset["password"]) >= 16
    anon = world.client()
    assert anon.post("/api/v1/auth/login", json={"username": "carol",
                                                 "password": "long-enough-1"}).status_code == 401
    assert anon.post("/api/v1/auth/login", json={"username": "carol",
                                                 "password": reset["password"]}).status_code == 200
    assert reset["password"] not in str([e.new for e in audit_of(world, "user/carol")])
    groups = admin.get(f"{ADMIN}/groups").json()
    assert {"name": "staff", "members": ["carol"]} in groups
    assert admin.post(f"{ADMIN}/groups", json={"name": "lab-users"}).status_code == 201
    assert admin.post(f"{ADMIN}/groups/lab-users/members",
                      json={"user": "carol"}).status_code == 204
    assert admin.delete(f"{ADMIN}/groups/staff/members/carol").status_code == 204
    assert admin.delete(f"{ADMIN}/groups/staff/members/carol").status_code == 404
    assert admin.delete(f"{ADMIN}/groups/lab-users").status_code == 204
    assert admin.get(f"{ADMIN}/users/carol").json()["groups"] == []
    assert admin.delete(f"{ADMIN}/users/carol").status_code == 204
    assert admin.get(f"{ADMIN}/users/carol").status_code == 404
    # A user holding a desktop is not deleted from under it.
    world.client("alice").post("/api/v1/pools/lab/connect")
    refused = admin.delete(f"{ADMIN}/users/alice")
    assert refused.status_code == 409 and "holds desktop(s)" in refused.json()["detail"]
    actions = [e.action for e in audit_log(world.ctx, actor="root")]
    assert {"user.create", "user.reset-password", "group.create", "group.add-member",
            "group.remove-member", "group.delete", "user.delete"} <= set(actions)


def test_revoking_an_entitlement_is_audited_and_takes_effect(world: BrokerWorld) -> None:
    admin = world.client("root")
    assert admin.delete(f"{ADMIN}/pools/lab/entitlements/user/alice").status_code == 204
    assert world.client("alice").post("/api/v1/pools/lab/connect").status_code == 403
    assert admin.delete(f"{ADMIN}/pools/lab/entitlements/user/alice").status_code == 404
    assert admin.delete(f"{ADMIN}/pools/lab/entitlements/team/x").status_code == 422
    entry = audit_of(world, "pool/lab")[0]
    assert entry.action == "entitlement.revoke"
    assert entry.old == {"kind": "user", "principal": "alice"}


def test_the_audit_log_is_listed_and_filtered_for_admins_only(world: BrokerWorld) -> None:
    admin = world.client("root")
    admin.post(f"{ADMIN}/pools/lab/disable")
    admin.post(f"{ADMIN}/hosts/h1/drain", json={"grace_s": 60})
    everything = admin.get(f"{ADMIN}/audit").json()
    assert [e["action"] for e in everything[:2]] == ["host.drain", "pool.disable"]
    assert everything[0]["address"] == "testclient" and everything[0]["actor"] == "root"
    assert everything[0]["old"]["state"] == "enabled"
    assert everything[0]["new"]["state"] == "draining"
    pools_only = admin.get(f"{ADMIN}/audit", params={"target": "pool"}).json()
    assert {e["target"] for e in pools_only} == {"pool/lab"}
    assert admin.get(f"{ADMIN}/audit", params={"actor": "nobody"}).json() == []
    assert world.client("alice").get(f"{ADMIN}/audit").status_code == 403
    assert world.client().get(f"{ADMIN}/audit").status_code == 401


def test_unknown_names_are_404s(world: BrokerWorld) -> None:
    admin = world.client("root")
    for method, path in (("patch", "/pools/nope"), ("delete", "/pools/nope"),
                         ("delete", "/hosts/nope"), ("delete", "/templates/nope/versions/1"),
                         ("delete", "/templates/golden/versions/9"),
                         ("post", "/users/nope/disable"), ("delete", "/groups/nope")):
        kwargs: dict[str, Any] = {"json": {}} if method == "patch" else {}
        answer = getattr(admin, method)(ADMIN + path, **kwargs)
        assert answer.status_code == 404, (path, answer.text)


def test_the_openapi_document_types_the_admin_surface(world: BrokerWorld) -> None:
    schema = world.client().get("/openapi.json").json()
    paths = schema["paths"]
    assert {"patch", "get", "delete"} <= set(paths["/api/v1/admin/pools/{name}"])
    for path in ("/api/v1/admin/pools/{name}/rollout", "/api/v1/admin/pools/{name}/disable",
                 "/api/v1/admin/users/{name}/password", "/api/v1/admin/audit",
                 "/api/v1/admin/templates/{name}/versions/{number}", "/metrics", "/readyz"):
        assert path in paths, path
    update = schema["components"]["schemas"]["PoolUpdate"]["properties"]
    power = update["power_policy"]["$ref"].rsplit("/", 1)[-1]  # typed, and never null
    assert schema["components"]["schemas"][power]["enum"] == ["running", "suspend", "shutoff"]
    grant = schema["components"]["schemas"]["GrantRequest"]["properties"]["kind"]
    assert grant["enum"] == ["user", "group"]
