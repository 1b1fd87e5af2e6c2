"""Publishing a template version through the admin API, with the administrator's cloud-init
user data and join hook; bad requests answer with a sentence naming the problem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.drivers.registry import forget_fake_hosts
from tests.broker_world import BrokerWorld, make_world

HOOK = "#!/bin/sh\nrealm join corp.example\n"


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.user("root", admin=True)
    w.user("alice")
    yield w
    w.ctx.close()
    forget_fake_hosts()


def test_an_admin_publishes_a_version_with_user_data_and_a_join_hook(
        world: BrokerWorld, tmp_path: Path) -> None:
    admin = world.client("root")
    answer = admin.post("/api/v1/admin/templates/corp/versions", json={
        "image": str(tmp_path / "golden.qcow2"), "customization": "cloud-init",
        "user_data": "#cloud-config\nruncmd:\n  - [true]\n", "join_hook": HOOK})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["template"], body["number"], body["customization"]) == (
        "corp", 1, "cloud-init")
    assert body["has_user_data"] and body["has_join_hook"]
    listed = [v for v in admin.get("/api/v1/admin/templates").json() if v["template"] == "corp"]
    assert [(v["has_user_data"], v["has_join_hook"]) for v in listed] == [(True, True)]
    with world.ctx.uow(read_only=True) as uow:
        template = uow.templates.find_by_name("corp")
        assert template is not None
        (version,) = uow.versions.list(template.id)
        assert version.join_hook == HOOK


@pytest.mark.parametrize(("body", "status", "problem"), [
    ({"customization": "fwcfg", "join_hook": "echo hi"}, 400, "interpreter line"),
    ({"user_data": "#cloud-config\n"}, 400, "needs the cloud-init customization"),
    ({"customization": "magic"}, 422, "customization"),
    ({"built_flavor": "kiosk"}, 422, "built_flavor"),
])
def test_bad_publish_requests_name_the_problem(
        world: BrokerWorld, tmp_path: Path, body: dict[str, str], status: int,
        problem: str) -> None:
    if "built_flavor" not in body:
        body = {"image": str(tmp_path / "golden.qcow2"), **body}
    answer = world.client("root").post("/api/v1/admin/templates/corp/versions", json=body)
    assert answer.status_code == status and problem in answer.json()["detail"], answer.text


def test_only_admins_publish(world: BrokerWorld, tmp_path: Path) -> None:
    answer = world.client("alice").post("/api/v1/admin/templates/corp/versions",
                                        json={"image": str(tmp_path / "golden.qcow2")})
    assert answer.status_code == 403
