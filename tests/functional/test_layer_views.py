"""User layer views (issue 14, item 5) through the service, the API and the CLI: a recorded
rebase's conflicts for the admin and for the desktop's own user (not for another user), a
pool's desktops per version and the conflicts of its rollout, a failed rebase with its error
and its event, and clear 404s for a desktop or pool that does not exist."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli import common, main
from deskpool.domain.errors import InvalidInput, NotFound
from deskpool.domain.layers import LayerConflict, LayerNote, RebaseReport
from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.images.layer_rebase import create_layer, rebase_layer
from deskpool.services.events import messages_for, recent_events
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.user_layers import UserLayerViews
from tests.broker_world import BrokerWorld, make_world
from tests.unit.layer_trees import put

LONG = "/usr/share/" + "/".join(["a-rather-long-directory-name"] * 6) + "/settings.conf"


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    w.pool("lab", kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
           on_logout=OnLogout.RECYCLE_AS_IS, user_layer_mib=512)
    w.user("alice", entitled_to=("lab",))
    w.user("bob", entitled_to=("lab",))
    w.user("root", admin=True)
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


@pytest.fixture()
def cli_env(world: BrokerWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(world.ctx.settings.data_dir))
    if world.ctx.settings.database_url:
        monkeypatch.setenv("DESKPOOL_DATABASE_URL", world.ctx.settings.database_url)
    monkeypatch.setattr(common.out, "width", 100)  # the console is made at import


def connect(world: BrokerWorld, user: str) -> uuid.UUID:
    answer = world.client(user).post("/api/v1/pools/lab/connect")
    assert answer.status_code == 200, answer.text
    return uuid.UUID(answer.json()["desktop_id"])


def new_version(world: BrokerWorld, tmp_path: Path) -> None:
    """Publish version 2 of the template and roll the pool out to it."""
    disk = tmp_path / "golden-2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(world.ctx).publish("golden", ImageFiles(disk=disk))
    PoolService(world.ctx).rollout("lab")


def real_report(tmp_path: Path) -> RebaseReport:
    """A real rebase of a small layer: one package file both sides changed (a conflict) and
    one file of no package both changed (a note)."""
    old, new, layer = tmp_path / "old", tmp_path / "new", tmp_path / "layer"
    put(old, "/etc/site.conf", "v1\n")
    put(new, "/etc/site.conf", "v2\n")
    put(old, "/etc/pkg.conf", "v1\n")
    put(new, "/etc/pkg.conf", "v2\n")
    for root in (old, new):
        put(root, "/var/lib/dpkg/info/pkg.list", "/.\n/etc/pkg.conf\n")
    create_layer(layer, "1")
    put(layer / "upper", "/etc/site.conf", "mine\n")
    put(layer / "upper", "/etc/pkg.conf", "mine\n")
    put(layer / "upper", "/opt/tool/run", "mine\n")
    return rebase_layer(old, new, layer, tmp_path / "out", old_version="1", new_version="2")


def test_conflicts_of_a_rebase_are_shown_to_the_admin_and_the_owner_only(
        world: BrokerWorld, tmp_path: Path) -> None:
    alice_desktop = connect(world, "alice")
    bob_desktop = connect(world, "bob")
    new_version(world, tmp_path)
    report = real_report(tmp_path)
    assert [c.path for c in report.conflicts] == ["/etc/pkg.conf"]
    assert [n.path for n in report.notes] == ["/etc/site.conf"]
    views = UserLayerViews(world.ctx)
    summary = views.record_rebase(alice_desktop, report)
    assert (summary.old_version, summary.new_version, summary.outcome) == (1, 2, "rebased")

    admin = world.client("root")
    shown = admin.get(f"/api/v1/admin/desktops/{alice_desktop}/layer")
    assert shown.status_code == 200, shown.text
    layer = shown.json()
    assert layer["user"] == "alice" and layer["pool"] == "lab"
    assert layer["template_version"] == 1 and layer["layer_version"] == 2
    assert layer["layer_bytes"] == report.bytes
    assert layer["changed_files"] == len(report.kept) + 1  # + the user's copy beside pkg.conf
    last = layer["last_rebase"]
    assert (last["conflict_count"], last["note_count"], last["kept"]) == (
        1, 1, len(report.kept))
    assert last["conflicts"] == [{"path": "/etc/pkg.conf",
                                  "reason": report.conflicts[0].reason,
                                  "user_copy": "/etc/pkg.conf.deskpool-conflict"}]
    assert [n["path"] for n in last["notes"]] == ["/etc/site.conf"]

    alice = world.client("alice")
    mine = alice.get(f"/api/v1/desktops/{alice_desktop}/layer-conflicts")
    assert mine.status_code == 200, mine.text
    assert [c["user_copy"] for c in mine.json()["conflicts"]] == [
        "/etc/pkg.conf.deskpool-conflict"]
    assert (mine.json()["old_version"], mine.json()["new_version"]) == (1, 2)
    # Bob's own desktop, never rebased: nothing to show, and not alice's either.
    bob = world.client("bob")
    own = bob.get(f"/api/v1/desktops/{bob_desktop}/layer-conflicts")
    assert own.status_code == 200 and own.json()["conflicts"] == []
    assert own.json()["outcome"] is None
    other = bob.get(f"/api/v1/desktops/{alice_desktop}/layer-conflicts")
    none = bob.get(f"/api/v1/desktops/{uuid.uuid4()}/layer-conflicts")
    assert other.status_code == none.status_code == 403  # as every user route: no probing
    assert "/etc/pkg.conf" not in other.text
    assert other.json() == none.json() == {"detail": "you have no such desktop"}
    # Users do not reach the admin's views.
    assert bob.get(f"/api/v1/admin/desktops/{alice_desktop}/layer").status_code == 403
    assert bob.get("/api/v1/admin/pools/lab/layers").status_code == 403

    events = [e for e in recent_events(world.ctx) if e.kind == "layer-rebased"]
    assert len(events) == 1 and events[0].severity == "warning"
    assert "1 conflict(s), 1 note(s)" in events[0].message
    assert events[0].user == "alice" and events[0].pool == "lab"
    # Alice reads it in her own words, in the portal's Messages; bob reads nothing of it.
    (told,) = [m for m in messages_for(world.ctx, "alice") if m.kind == "layer-conflicts"]
    assert "updated to version 2" in told.message
    assert "/etc/pkg.conf (your copy: /etc/pkg.conf.deskpool-conflict)" in told.message
    assert not [m for m in messages_for(world.ctx, "bob") if m.kind == "layer-conflicts"]


def test_pool_view_counts_desktops_per_version_and_sums_conflicts(
        world: BrokerWorld, tmp_path: Path, cli_env: None) -> None:
    alice_desktop = connect(world, "alice")
    bob_desktop = connect(world, "bob")
    new_version(world, tmp_path)
    world.fill()  # free desktops of version 1 replaced by ones of version 2
    views = UserLayerViews(world.ctx)
    conflicts = [LayerConflict(f"/etc/app{i}.conf", "changed by both; file of package app",
                               f"/etc/app{i}.conf.deskpool-conflict") for i in range(2)]
    views.record_rebase(alice_desktop, RebaseReport(
        "v1", "v2", kept=["/etc/x"], conflicts=conflicts,
        notes=[LayerNote("/opt/y", "the user's version wins")], bytes=4096))
    # Bob's failed first, then worked: counted once, as rebased, with its conflict.
    views.record_rebase(bob_desktop, error="the layer disk is full", new_version=2)
    views.record_rebase(bob_desktop, RebaseReport(
        "1", "2", conflicts=[LayerConflict(LONG, "changed by both", None)]))
    # A rebase onto another version does not count in this rollout.
    views.record_rebase(alice_desktop, RebaseReport("2", "3", conflicts=conflicts))

    admin = world.client("root")
    answer = admin.get("/api/v1/admin/pools/lab/layers")
    assert answer.status_code == 200, answer.text
    view = answer.json()
    listed = admin.get("/api/v1/admin/desktops").json()
    on_v1 = sum(1 for d in listed if d["pool"] == "lab" and d["version"] == 1
                and d["state"] not in ("retired", "deleting"))
    on_v2 = sum(1 for d in listed if d["pool"] == "lab" and d["version"] == 2
                and d["state"] not in ("retired", "deleting"))
    assert on_v1 >= 2  # the held desktops stay on version 1 until their users leave
    assert view["versions"] == [
        {"version": 1, "desktops": on_v1, "current": False},
        {"version": 2, "desktops": on_v2, "current": True}]
    assert view["current_version"] == 2 and view["user_layer_mib"] == 512
    # Alice's rebase onto 3 is her newest, but only rebases onto 2 are this rollout's.
    assert (view["rebased"], view["failed"], view["conflicts"], view["notes"]) == (2, 0, 3, 1)
    assert sorted(c["path"] for c in view["conflict_list"]) == sorted(
        [LONG, "/etc/app0.conf", "/etc/app1.conf"])
    assert view["failures"] == []

    runner = CliRunner()
    shown = runner.invoke(main.app, ["layer", "pool", "lab"])
    assert shown.exit_code == 0, shown.output
    assert "current" in shown.output and "3 conflict(s)" in shown.output
    assert "…" not in shown.output, shown.output  # long paths fold, never cut off
    assert "/etc/app0.conf" in shown.output and "/usr/share/" in shown.output
    desktop_name = next(d["name"] for d in listed if d["id"] == str(alice_desktop))
    one = runner.invoke(main.app, ["layer", "show", desktop_name])
    assert one.exit_code == 0, one.output
    assert f"desktop {desktop_name}" in one.output and "v2 to v3" in one.output
    assert "/etc/app1.conf.deskpool-conflict" in one.output


def test_a_failed_rebase_is_recorded_with_its_error_and_an_event(
        world: BrokerWorld, tmp_path: Path, cli_env: None) -> None:
    alice_desktop = connect(world, "alice")
    new_version(world, tmp_path)
    views = UserLayerViews(world.ctx)
    views.record_layer_status(alice_desktop, 1, 3 * 2**20, 7)
    failed = views.record_rebase(alice_desktop, error="the layer's manifest is unreadable")
    # Versions default to the layer's reported one and the pool's current one.
    assert (failed.old_version, failed.new_version, failed.outcome) == (1, 2, "failed")
    layer = views.desktop_layer(alice_desktop)
    assert layer.last_rebase is not None
    assert layer.last_rebase.error == "the layer's manifest is unreadable"
    assert (layer.layer_version, layer.layer_bytes, layer.changed_files) == (1, 3 * 2**20, 7)

    events = [e for e in recent_events(world.ctx) if e.kind == "layer-rebase-failed"]
    assert len(events) == 1 and events[0].severity == "error"
    assert "the layer's manifest is unreadable" in events[0].message
    assert "from version 1 to 2" in events[0].message
    admin = world.client("root")
    listed = admin.get("/api/v1/admin/events").json()
    assert any(e["kind"] == "layer-rebase-failed" for e in listed)

    pool = admin.get("/api/v1/admin/pools/lab/layers").json()
    assert (pool["rebased"], pool["failed"], pool["conflicts"]) == (0, 1, 0)
    assert pool["failures"][0]["error"] == "the layer's manifest is unreadable"
    mine = world.client("alice").get(f"/api/v1/desktops/{alice_desktop}/layer-conflicts")
    assert mine.json()["outcome"] == "failed" and mine.json()["conflicts"] == []

    shown = CliRunner().invoke(main.app, ["layer", "show", str(alice_desktop)])
    assert shown.exit_code == 0, shown.output
    assert "failed" in shown.output and "manifest is unreadable" in shown.output
    assert "3.0 MiB, 7 changed file(s)" in shown.output


def test_unknown_desktops_and_pools_and_bad_input_get_clear_answers(
        world: BrokerWorld, cli_env: None) -> None:
    admin = world.client("root")
    missing = uuid.uuid4()
    answer = admin.get(f"/api/v1/admin/desktops/{missing}/layer")
    assert answer.status_code == 404
    assert answer.json()["detail"] == f"desktop {missing} does not exist"
    answer = admin.get("/api/v1/admin/pools/nowhere/layers")
    assert answer.status_code == 404
    assert answer.json()["detail"] == "pool 'nowhere' does not exist"
    # Malformed path input is refused before any lookup.
    for path in ("/api/v1/admin/desktops/not-a-uuid/layer",
                 "/api/v1/admin/desktops/%00/layer",
                 f"/api/v1/admin/desktops/{'9' * 400}/layer",
                 "/api/v1/admin/pools/lab%00/layers",
                 f"/api/v1/admin/pools/{'x' * 300}/layers",
                 "/api/v1/desktops/%00/layer-conflicts"):
        assert admin.get(path).status_code == 422, path

    views = UserLayerViews(world.ctx)
    with pytest.raises(NotFound, match=f"desktop {missing} does not exist"):
        views.record_rebase(missing, error="boom")
    with pytest.raises(NotFound, match="pool 'nowhere' does not exist"):
        views.pool_layers("nowhere")
    desktop = next(iter(views.pool_layers("lab").versions))
    assert desktop.version == 1
    some = uuid.UUID(admin.get("/api/v1/admin/desktops").json()[0]["id"])
    with pytest.raises(InvalidInput, match="exactly one"):
        views.record_rebase(some)
    with pytest.raises(InvalidInput, match=r"'golden-2' .* not a template version number"):
        views.record_rebase(some, RebaseReport("1", "golden-2"))
    with pytest.raises(InvalidInput, match="cannot be negative"):
        views.record_layer_status(some, 1, -1, 0)

    gone = CliRunner().invoke(main.app, ["layer", "pool", "nowhere"])
    assert gone.exit_code != 0 and isinstance(gone.exception, NotFound)
    gone = CliRunner().invoke(main.app, ["layer", "show", "no-such-desktop"])
    assert gone.exit_code != 0 and "no-such-desktop" in str(gone.exception)


def test_the_layer_schemas_are_in_the_openapi_document(world: BrokerWorld) -> None:
    document = world.client().get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert {"DesktopLayer", "LayerRebaseSummary", "LayerItem", "PoolLayers",
            "LayerVersionCount", "LayerRolloutConflict", "MyLayerConflicts"} <= set(schemas)
    paths = document["paths"]
    assert "404" in paths["/api/v1/admin/desktops/{desktop_id}/layer"]["get"]["responses"]
    assert "404" in paths["/api/v1/admin/pools/{name}/layers"]["get"]["responses"]
    mine = paths["/api/v1/desktops/{desktop_id}/layer-conflicts"]["get"]
    assert {"401", "403", "422"} <= set(mine["responses"])


def test_an_admin_asks_for_a_rebase_through_the_api_and_the_cli(
        world: BrokerWorld, tmp_path: Path, cli_env: None) -> None:
    alice_desktop = connect(world, "alice")
    new_version(world, tmp_path)
    admin = world.client("root")
    waiting = admin.get("/api/v1/admin/pools/lab/layers").json()["awaiting_rebase"]
    assert waiting >= 1
    busy = admin.post(f"/api/v1/admin/desktops/{alice_desktop}/rebase")
    assert busy.status_code == 409, busy.text
    assert "in use by alice: its user layer is rebased when they log off" in (
        busy.json()["detail"])
    assert world.client("bob").post(
        f"/api/v1/admin/desktops/{alice_desktop}/rebase").status_code == 403
    assert admin.post(f"/api/v1/admin/desktops/{uuid.uuid4()}/rebase").status_code == 404
    listed = admin.get("/api/v1/admin/desktops").json()
    name = next(d["name"] for d in listed if d["id"] == str(alice_desktop))
    refused = CliRunner().invoke(main.app, ["desktop", "rebase", name])
    assert refused.exit_code != 0 and "in use by alice" in str(refused.exception)

    # She leaves: her layer is rebased at her logoff (the fake's guest leaves no report).
    left = world.client("alice").post(f"/api/v1/desktops/{alice_desktop}/logoff")
    assert left.status_code == 200, left.text
    world.fill(1)
    mine = UserLayerViews(world.ctx).desktop_layer(alice_desktop)
    assert mine.template_version == 2
    again = admin.post(f"/api/v1/admin/desktops/{alice_desktop}/rebase")
    assert again.status_code == 409 and "already runs its pool's version 2" in again.text
    shown = CliRunner().invoke(main.app, ["layer", "pool", "lab"])
    assert shown.exit_code == 0 and "waiting for a rebase: 0 desktop(s)" in shown.output, (
        shown.output)
