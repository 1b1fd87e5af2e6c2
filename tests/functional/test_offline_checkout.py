"""Offline desktops on the server (issue 15), over HTTP on the fake driver: the pool's offline
policy, check-out (the lock, the frozen VM, the signed lease), the online connect refused
while out, the reconciler leaving it alone, check-in of the changed blocks (refused on another
base, resumed after a cut), sync, rollback, revoke and a forced check-in, with their events
and audit entries. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deskpool.domain.errors import Conflict
from deskpool.domain.offline import LeaseRefused, SignedLease, verify_lease
from deskpool.drivers.base import root_volume_name
from deskpool.images.layer_delta import (
    BlockManifest,
    LayerDelta,
    block_manifest,
    file_sha256,
    layer_digest,
    plan_delta,
    read_chunk,
)
from deskpool.images.offline_layers import layer_spec, read_guest_bytes
from deskpool.services import offline_transfers
from deskpool.services.audit import audit_log
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.offline_secrets import secrets_dir
from deskpool.services.pool_admin import PoolAdmin
from tests.broker_world import BrokerWorld, make_world

API = "/api/v1"
POLICY = {"may_go_offline": True, "max_days_offline": 10, "sync_every_days": 3,
          "may_roll_back": True}
LAPTOP = "alice-laptop"


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    """Pool ``home`` (stateful, dedicated, may go offline) with alice's desktop ready for her;
    pool ``lab`` (stateless) too; bob and admin root."""
    offline_transfers._open.clear()
    w = make_world(tmp_path, database_url=database_url)
    w.user("root", admin=True)
    admin = w.client("root")
    made = admin.post(f"{API}/admin/pools", json={
        "name": "home", "template": "golden", "kind": "stateful", "assignment": "dedicated",
        "on_logout": "recycle-as-is", "max_size": 3, "spare": 2,
        "naming_pattern": "home-{n:02}", "offline": POLICY})
    assert made.status_code == 200, made.text
    w.pool("lab")
    w.user("alice", entitled_to=("home", "lab"))
    w.user("bob", entitled_to=("home",))
    w.fill()
    for user in ("alice", "bob"):
        got = w.client(user).post(f"{API}/pools/home/connect")
        assert got.status_code == 200 and got.json()["status"] == "ready", got.text
        off = w.client(user).post(f"{API}/desktops/{got.json()['desktop_id']}/logoff")
        assert off.status_code == 200, off.text
    w.fill()
    assert desktop_of(w, "alice").state == "ready"
    try:
        yield w
    finally:
        offline_transfers._open.clear()
        w.ctx.close()


def desktop_of(world: BrokerWorld, user: str) -> SimpleNamespace:
    """The user's desktop in pool home, as the database has it now."""
    with world.ctx.uow(read_only=True) as uow:
        (mine,) = [d for d in uow.offline_checkouts.desktops_of(user)
                   if d.name.startswith("home")]
        return SimpleNamespace(id=mine.id, name=mine.name, state=mine.state.value,
                               assigned_user=mine.assigned_user)


def check_out(world: BrokerWorld, user: str = "alice", laptop: str = LAPTOP) -> dict[str, Any]:
    name = desktop_of(world, user).name
    answer = world.client(user).post(f"{API}/offline/desktops/{name}/checkout",
                                     json={"laptop": laptop})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def public_key(grant: dict[str, Any]) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(grant["public_key_pem"].encode())
    assert isinstance(key, Ed25519PublicKey)
    return key


class Laptop:
    """The laptop's end: the layer downloaded beside its cached base (the same relative
    layout as the server's), the guest's writes through qemu-io, the changed blocks sent."""

    def __init__(self, world: BrokerWorld, root: Path, grant: dict[str, Any]) -> None:
        self.world, self.grant = world, grant
        self.desktop = grant["checkout"]["desktop"]
        self.key = base64.b64decode(grant["data_key"])
        server = secrets_dir(world.ctx.settings)
        desktop_id = desktop_of(world, grant["checkout"]["user"]).id
        self.layer = root / "layers" / str(desktop_id) / "layer.qcow2"
        self.layer.parent.mkdir(parents=True)
        (root / "bases").mkdir()
        base = f"{grant['base_sha256']}.qcow2"
        shutil.copyfile(server / "bases" / base, root / "bases" / base)
        client = world.client(grant["checkout"]["user"])
        got = client.get(f"{API}/offline/desktops/{self.desktop}/layer",
                         params={"laptop": grant["checkout"]["laptop"]})
        assert got.status_code == 200, got.text
        self.layer.write_bytes(got.content)
        assert layer_digest(self.layer) == grant["layer_sha256"]
        self.synced: BlockManifest = block_manifest(self.layer)  # as of the last sync
        self.client = client

    def write(self, offset: int, pattern: int, length: int = 64 * 1024) -> None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, self.key.hex().encode())
        os.close(write_fd)
        try:
            subprocess.run(["qemu-io", "--object", f"secret,id=layerkey0,file=/dev/fd/{read_fd}",
                            "-c", f"write -P {pattern} {offset} {length}",
                            layer_spec(self.layer, with_backing=True)],
                           check=True, pass_fds=(read_fd,), capture_output=True)
        finally:
            os.close(read_fd)

    def plan(self) -> LayerDelta:
        return plan_delta(self.layer, self.synced, self.grant["base_sha256"])

    def begin(self, delta: LayerDelta, kind: str = "checkin") -> Any:
        return self.client.post(f"{API}/offline/desktops/{self.desktop}/transfer",
                                params={"laptop": LAPTOP, "kind": kind}, content=delta.encode(),
                                headers={"content-type": "application/octet-stream"})

    def send(self, delta: LayerDelta, indexes: list[int]) -> Any:
        answer = None
        for index in indexes:
            answer = self.client.put(
                f"{API}/offline/desktops/{self.desktop}/transfer/chunks/{index}",
                params={"laptop": LAPTOP}, content=read_chunk(self.layer, delta.chunks[index]),
                headers={"content-type": "application/octet-stream"})
            assert answer.status_code == 200, answer.text
        return answer

    def commit(self) -> Any:
        return self.client.post(f"{API}/offline/desktops/{self.desktop}/transfer/commit",
                                json={"laptop": LAPTOP})


def server_layer(world: BrokerWorld, user: str = "alice") -> Path:
    return (secrets_dir(world.ctx.settings) / "layers" / str(desktop_of(world, user).id)
            / "layer.qcow2")


def events_of(world: BrokerWorld, kind: str) -> list[str]:
    return [e.message for e in recent_events(world.ctx) if e.kind == kind]


# --- policy ----------------------------------------------------------------------------------

def test_the_pool_policy_is_stored_shown_changed_in_part_and_audited(world: BrokerWorld) -> None:
    admin = world.client("root")
    pools = {p["name"]: p for p in admin.get(f"{API}/admin/pools").json()}
    assert pools["home"]["offline"] == {**POLICY, "usb_passthrough": False, "printing": False,
                                        "offline_sso": False}
    assert pools["lab"]["offline"]["may_go_offline"] is False  # the default: never
    changed = admin.patch(f"{API}/admin/pools/home", json={"offline": {"printing": True}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["offline"]["printing"] is True
    assert changed.json()["offline"]["max_days_offline"] == 10  # the rest stays
    entry = audit_log(world.ctx, target="pool/home")[0]
    assert entry.action == "pool.update"
    assert entry.old["offline"]["printing"] is False and entry.new["offline"]["printing"] is True
    # Refused, naming why; nothing changes.
    bad = admin.patch(f"{API}/admin/pools/home", json={"offline": {"sync_every_days": 11}})
    assert bad.status_code == 400 and "sync_every_days" in bad.json()["detail"]
    stateless = admin.patch(f"{API}/admin/pools/lab", json={"offline": {"may_go_offline": True}})
    assert stateless.status_code == 400
    assert "only a stateful, dedicated pool" in stateless.json()["detail"]
    assert PoolAdmin(world.ctx).pools.get("lab").offline.may_go_offline is False


# --- check-out -------------------------------------------------------------------------------

def test_check_out_locks_freezes_and_signs_a_lease_the_laptop_accepts(
        world: BrokerWorld) -> None:
    mine = desktop_of(world, "alice")
    listed = world.client("alice").get(f"{API}/offline/desktops").json()
    assert [(d["desktop"], d["checkout"]) for d in listed] == [(mine.name, None)]
    grant = check_out(world)
    out = desktop_of(world, "alice")
    assert out.state == "checked_out"
    assert world.fake.get_vm(mine.id).power_state.value == "shutoff"  # frozen
    signed = SignedLease.from_json(grant["lease"])
    now = datetime.now(UTC)
    lease = verify_lease(signed, public_key(grant), now=now, user="alice",
                         desktop_id=mine.id, laptop_id=LAPTOP)
    assert lease.expires_at - lease.issued_at == timedelta(days=3)  # sync every 3 days
    assert lease.policy.may_roll_back is True
    # The data key opens the server's layer; the database keeps it only wrapped.
    key = base64.b64decode(grant["data_key"])
    assert read_guest_bytes(server_layer(world), key, 0, 16) == bytes(16)
    with world.ctx.uow(read_only=True) as uow:
        row = uow.offline_checkouts.active_for(mine.id)
        assert row is not None and row.laptop_id == LAPTOP and row.user_name == "alice"
        assert grant["data_key"] not in row.escrowed_key and "ciphertext" in row.escrowed_key
    listed = world.client("alice").get(f"{API}/offline/desktops").json()
    assert listed[0]["state"] == "checked_out" and listed[0]["checkout"]["laptop"] == LAPTOP
    assert events_of(world, "offline-checkout") == [
        f"alice checked {mine.name} out to {LAPTOP} until {lease_date(grant)}"]


def lease_date(grant: dict[str, Any]) -> str:
    when = datetime.fromisoformat(grant["checkout"]["lease_expires_at"])
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def test_bad_check_outs_are_refused_clearly_and_store_nothing(world: BrokerWorld) -> None:
    alice, bob = world.client("alice"), world.client("bob")
    mine, bobs = desktop_of(world, "alice"), desktop_of(world, "bob")
    other = bob.post(f"{API}/offline/desktops/{mine.name}/checkout", json={"laptop": "b1"})
    assert other.status_code == 403
    assert f"desktop {mine.name} is not assigned to you" in other.json()["detail"]
    missing = alice.post(f"{API}/offline/desktops/home-99/checkout", json={"laptop": "a1"})
    assert missing.status_code == 404
    bad_name = alice.post(f"{API}/offline/desktops/{mine.name}/checkout",
                          json={"laptop": "../etc"})
    assert bad_name.status_code == 422
    PoolAdmin(world.ctx).update("home", {"offline": {"may_go_offline": False}})
    forbidden = alice.post(f"{API}/offline/desktops/{mine.name}/checkout",
                           json={"laptop": "a1"})
    assert forbidden.status_code == 403
    assert "pool home does not allow its desktops to go offline" in forbidden.json()["detail"]
    with world.ctx.uow(read_only=True) as uow:
        assert uow.offline_checkouts.active() == []
    assert desktop_of(world, "alice").state == "ready"
    PoolAdmin(world.ctx).update("home", {"offline": {"may_go_offline": True}})

    grant = check_out(world)
    again = alice.post(f"{API}/offline/desktops/{mine.name}/checkout", json={"laptop": "a2"})
    assert again.status_code == 409
    assert (f"desktop {mine.name} is already checked out to {LAPTOP} until "
            f"{lease_date(grant)}") in again.json()["detail"]
    with world.ctx.uow(read_only=True) as uow:
        assert [c.laptop_id for c in uow.offline_checkouts.active()] == [LAPTOP]
    assert desktop_of(world, "bob").state == bobs.state == "ready"


def test_an_online_connect_is_refused_naming_the_laptop_and_the_date(world: BrokerWorld) -> None:
    grant = check_out(world)
    name = grant["checkout"]["desktop"]
    refused = world.client("alice").post(f"{API}/pools/home/connect")
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"].startswith(
        f"desktop {name} is checked out to {LAPTOP} until {lease_date(grant)}")
    assert desktop_of(world, "alice").state == "checked_out"
    # Other users and pools are not affected.
    assert world.client("bob").post(f"{API}/pools/home/connect").json()["status"] == "ready"


def test_the_reconciler_and_admins_leave_a_checked_out_desktop_alone(
        world: BrokerWorld) -> None:
    check_out(world)
    mine = desktop_of(world, "alice")
    world.client("root").patch(f"{API}/admin/pools/home",
                               json={"power_policy": "running", "max_age_s": 1})
    world.fill(passes=2)
    drained = world.client("root").post(f"{API}/admin/hosts/h1/drain", json={})
    assert drained.status_code == 200, drained.text
    world.fill(passes=2)
    after = desktop_of(world, "alice")
    assert (after.state, after.assigned_user) == ("checked_out", "alice")
    assert world.fake.get_vm(mine.id).power_state.value == "shutoff"  # not powered on
    assert root_volume_name(mine.id) in world.fake.list_volumes()
    with pytest.raises(Conflict, match=f"desktop {mine.name} is checked out to a laptop"):
        DesktopService(world.ctx).delete(mine.name)
    assert desktop_of(world, "alice").state == "checked_out"


# --- check-in --------------------------------------------------------------------------------

def test_check_in_sends_the_changed_blocks_and_brings_the_desktop_back(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    laptop.write(1 << 20, 0x5A)
    laptop.write(40 << 20, 0x33)
    delta = laptop.plan()
    started = laptop.begin(delta)
    assert started.status_code == 200, started.text
    assert started.json()["missing"] == list(range(len(delta.chunks)))
    laptop.send(delta, started.json()["missing"])
    with world.ctx.uow(read_only=True) as uow:
        rows = uow.offline_checkouts.active()
        assert [r.transfer_kind for r in rows] == ["checkin"]
    done = laptop.commit()
    assert done.status_code == 200, done.text
    assert done.json()["checkout"]["status"] == "checked-in" and done.json()["lease"] is None
    assert file_sha256(server_layer(world)) == file_sha256(laptop.layer)
    assert read_guest_bytes(server_layer(world), laptop.key, 40 << 20, 4) == b"\x33" * 4
    assert desktop_of(world, "alice").state == "ready"
    assert len(events_of(world, "offline-checkin")) == 1
    back = world.client("alice").post(f"{API}/pools/home/connect").json()
    assert back["status"] == "ready" and back["desktop"] == laptop.desktop
    world.client("alice").post(f"{API}/desktops/{back['desktop_id']}/logoff")
    world.fill()
    # A second check-out hands the same layer out again, under a new wrapping.
    again = check_out(world, laptop="alice-desk")
    assert again["layer_sha256"] == layer_digest(laptop.layer)
    assert base64.b64decode(again["data_key"]) == laptop.key


def test_a_check_in_on_another_base_is_refused_and_changes_nothing(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    before = file_sha256(server_layer(world))
    laptop.write(0, 0x11)
    delta = plan_delta(laptop.layer, laptop.synced, "ab" * 32)
    refused = laptop.begin(delta)
    assert refused.status_code == 409, refused.text
    assert "base image sha256 abababab" in refused.json()["detail"]
    assert file_sha256(server_layer(world)) == before
    assert desktop_of(world, "alice").state == "checked_out"
    no_transfer = laptop.commit()
    assert no_transfer.status_code == 409
    assert "no check-in or sync" in no_transfer.json()["detail"]


def test_a_cut_check_in_resumes_after_a_restart_and_ends_identical(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    for n in range(6):
        laptop.write((n * 9 + 3) << 20, 0x40 + n)
    before = file_sha256(server_layer(world))
    delta = laptop.plan()
    assert len(delta.chunks) >= 6
    missing = laptop.begin(delta).json()["missing"]
    laptop.send(delta, missing[:3])
    # Cut: the broker restarts (its open staged check-in is gone), the laptop comes back.
    offline_transfers._open.clear()
    early = laptop.commit()
    assert early.status_code == 503 and "not received yet" in early.json()["detail"]
    # Part of it is in the layer, under its undo journal: nothing may read it meanwhile.
    fetch = world.client("alice").get(f"{API}/offline/desktops/{laptop.desktop}/layer",
                                      params={"laptop": LAPTOP})
    assert fetch.status_code == 409 and "in flight" in fetch.json()["detail"]
    assert (server_layer(world).parent / "staging" / "undo").exists()
    assert file_sha256(server_layer(world)) != before
    assert desktop_of(world, "alice").state == "checked_out"  # the lock held
    resumed = laptop.begin(delta).json()
    assert resumed["missing"] == missing[3:]  # only the rest travels
    laptop.send(delta, resumed["missing"])
    assert laptop.commit().status_code == 200
    assert file_sha256(server_layer(world)) == file_sha256(laptop.layer)
    assert desktop_of(world, "alice").state == "ready"


def test_a_damaged_chunk_is_refused_and_nothing_is_written(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    laptop.write(0, 0x77)
    delta = laptop.plan()
    laptop.begin(delta)
    damaged = world.client("alice").put(
        f"{API}/offline/desktops/{laptop.desktop}/transfer/chunks/0", params={"laptop": LAPTOP},
        content=b"\x00" * 10, headers={"content-type": "application/octet-stream"})
    assert damaged.status_code == 503 and "send it again" in damaged.json()["detail"]
    assert laptop.begin(delta).json()["missing"] == list(range(len(delta.chunks)))


# --- sync, rollback, revoke, force --------------------------------------------------------

def test_sync_applies_blocks_keeps_the_lock_and_renews_the_lease(
        world: BrokerWorld, tmp_path: Path) -> None:
    grant = check_out(world)
    laptop = Laptop(world, tmp_path / "laptop", grant)
    laptop.write(2 << 20, 0x21)
    delta = laptop.plan()
    laptop.send(delta, laptop.begin(delta, kind="sync").json()["missing"])
    synced = laptop.commit()
    assert synced.status_code == 200, synced.text
    assert synced.json()["checkout"]["status"] == "out"
    assert synced.json()["lease"]["lease"] != grant["lease"]
    assert file_sha256(server_layer(world)) == file_sha256(laptop.layer)
    assert desktop_of(world, "alice").state == "checked_out"
    # A plan made against the copy from before that sync no longer applies: refused, kept.
    after_sync = file_sha256(server_layer(world))
    laptop.write(3 << 20, 0x22)
    stale = laptop.begin(laptop.plan())
    assert stale.status_code == 409
    assert "not the one the check-in was made against" in stale.json()["detail"]
    assert file_sha256(server_layer(world)) == after_sync
    renewed = world.client("alice").post(
        f"{API}/offline/desktops/{laptop.desktop}/sync",
        json={"laptop": LAPTOP, "bytes_pending": 4096})
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["checkout"]["bytes_pending"] == 4096
    listed = world.client("root").get(f"{API}/admin/offline/checkouts").json()
    assert [(c["desktop"], c["bytes_pending"]) for c in listed] == [(laptop.desktop, 4096)]
    assert listed[0]["last_sync_at"] is not None
    # Renewals never stretch a check-out past its maximum days offline (10 here).
    with world.ctx.uow() as uow:
        (row,) = uow.offline_checkouts.active()
        row.checked_out_at -= timedelta(days=9, hours=23)
        uow.commit()
    capped = world.client("alice").post(f"{API}/offline/desktops/{laptop.desktop}/sync",
                                        json={"laptop": LAPTOP}).json()
    left = (datetime.fromisoformat(capped["checkout"]["lease_expires_at"])
            - datetime.now(UTC))
    assert timedelta(minutes=50) < left <= timedelta(hours=1)
    with world.ctx.uow() as uow:
        (row,) = uow.offline_checkouts.active()
        row.checked_out_at -= timedelta(hours=2)
        uow.commit()
    over = world.client("alice").post(f"{API}/offline/desktops/{laptop.desktop}/sync",
                                      json={"laptop": LAPTOP})
    assert over.status_code == 409
    assert "offline for the maximum of 10 days; check it in" in over.json()["detail"]
    wrong_laptop = world.client("alice").post(
        f"{API}/offline/desktops/{laptop.desktop}/sync", json={"laptop": "other"})
    assert wrong_laptop.status_code == 403


def test_rollback_discards_the_laptop_and_follows_the_policy(
        world: BrokerWorld, tmp_path: Path) -> None:
    name = check_out(world)["checkout"]["desktop"]
    PoolAdmin(world.ctx).update("home", {"offline": {"may_roll_back": False}})
    refused = world.client("alice").post(f"{API}/offline/desktops/{name}/rollback")
    assert refused.status_code == 403
    assert "does not let users roll back" in refused.json()["detail"]
    assert desktop_of(world, "alice").state == "checked_out"
    by_admin = world.client("root").post(f"{API}/admin/offline/checkouts/{name}/rollback")
    assert by_admin.status_code == 200 and by_admin.json()["status"] == "rolled-back"
    assert desktop_of(world, "alice").state == "ready"
    assert audit_log(world.ctx, target=f"desktop/{name}")[0].action == "offline.rollback"
    PoolAdmin(world.ctx).update("home", {"offline": {"may_roll_back": True}})
    check_out(world)
    mine = world.client("alice").post(f"{API}/offline/desktops/{name}/rollback")
    assert mine.status_code == 200 and mine.json()["status"] == "rolled-back"
    assert len(events_of(world, "offline-rollback")) == 2
    not_out = world.client("alice").post(f"{API}/offline/desktops/{name}/rollback")
    assert not_out.status_code == 409 and "is not checked out" in not_out.json()["detail"]


def test_revoke_makes_the_laptop_refuse_and_force_check_in_releases(
        world: BrokerWorld) -> None:
    grant = check_out(world)
    name, checkout_id = grant["checkout"]["desktop"], uuid.UUID(grant["checkout"]["id"])
    assert world.client("alice").post(f"{API}/admin/offline/checkouts/{name}/revoke"
                                      ).status_code == 403  # admins only
    revoked = world.client("root").post(f"{API}/admin/offline/checkouts/{name}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    heard = world.client("alice").get(f"{API}/offline/revoked").json()
    assert heard == [str(checkout_id)]
    with pytest.raises(LeaseRefused, match="revoked by an administrator"):
        verify_lease(SignedLease.from_json(grant["lease"]), public_key(grant),
                     now=datetime.now(UTC), user="alice",
                     desktop_id=desktop_of(world, "alice").id, laptop_id=LAPTOP,
                     revoked_checkouts={uuid.UUID(i) for i in heard})
    no_renewal = world.client("alice").post(f"{API}/offline/desktops/{name}/sync",
                                            json={"laptop": LAPTOP})
    assert no_renewal.status_code == 403 and "revoked" in no_renewal.json()["detail"]
    assert desktop_of(world, "alice").state == "checked_out"  # the lock stays
    forced = world.client("root").post(f"{API}/admin/offline/checkouts/{name}/force-checkin")
    assert forced.status_code == 200 and forced.json()["status"] == "forced-in"
    assert desktop_of(world, "alice").state == "ready"
    assert [a.action for a in audit_log(world.ctx, target=f"desktop/{name}")] == [
        "offline.force-checkin", "offline.revoke"]
    assert events_of(world, "offline-revoke") and events_of(world, "offline-force-checkin")
    assert world.client("root").get(f"{API}/admin/offline/checkouts").json() == []


# --- one transfer slot per check-in -------------------------------------------------------


def transfer_slots(world: BrokerWorld) -> list[tuple[str | None, datetime | None]]:
    from sqlalchemy import select

    from deskpool.store.models import HostSlot
    with world.ctx.uow(read_only=True) as uow:
        return [(h, u) for h, u in uow.session.execute(
            select(HostSlot.holder, HostSlot.held_until).where(HostSlot.kind == "transfer"))]


def test_a_check_in_holds_one_slot_from_its_plan_to_its_commit(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    with world.ctx.uow() as uow:
        (host,) = uow.hosts.list()
        host.transfer_slots, host_id = 1, host.id
        uow.commit()
    for n in range(4):
        laptop.write((n * 7 + 1) << 20, 0x50 + n)
    delta = laptop.plan()
    missing = laptop.begin(delta).json()["missing"]
    with world.ctx.uow(read_only=True) as uow:
        checkout_id = uow.offline_checkouts.active()[0].id
    held = [h for h, _ in transfer_slots(world) if h]
    assert held == [f"checkin:{checkout_id}"]
    # Between two of its requests no other transfer gets the host's only slot.
    from deskpool.services.host_slots import HostBusy, SlotKind, host_slot
    with pytest.raises(HostBusy), host_slot(world.ctx, host_id, SlotKind.TRANSFER, 1,
                                            holder="another-laptop", wait_up_to=0.1):
        pass
    laptop.send(delta, missing[:2])
    assert [h for h, _ in transfer_slots(world) if h] == held  # the same one, renewed
    laptop.send(delta, missing[2:])
    assert laptop.commit().status_code == 200
    assert [h for h, _ in transfer_slots(world) if h] == []  # given back at the commit


def test_a_vanished_laptops_slot_expires_and_its_transfer_still_resumes(
        world: BrokerWorld, tmp_path: Path) -> None:
    from sqlalchemy import update

    from deskpool.services.host_slots import SlotKind, host_slot
    from deskpool.store.models import HostSlot
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    with world.ctx.uow() as uow:
        (host,) = uow.hosts.list()
        host.transfer_slots, host_id = 1, host.id
        uow.commit()
    laptop.write(5 << 20, 0x61)
    laptop.write(30 << 20, 0x62)
    delta = laptop.plan()
    missing = laptop.begin(delta).json()["missing"]
    laptop.send(delta, missing[:1])
    # The laptop vanishes; its lease runs out (as if TRANSFER_LEASE had passed).
    with world.ctx.uow() as uow:
        uow.session.execute(update(HostSlot).values(
            held_until=datetime.now(UTC) - timedelta(seconds=1)))
        uow.commit()
    offline_transfers._renewed.clear()  # this process's last renewal is that old too
    with host_slot(world.ctx, host_id, SlotKind.TRANSFER, 1, holder="another-laptop",
                   wait_up_to=0.5):
        # While another holds it, the laptop that came back is told to wait (503).
        late = laptop.client.put(
            f"{API}/offline/desktops/{laptop.desktop}/transfer/chunks/{missing[1]}",
            params={"laptop": LAPTOP}, content=read_chunk(laptop.layer, delta.chunks[missing[1]]),
            headers={"content-type": "application/octet-stream"})
        assert late.status_code == 503 and "retry-after" in late.headers
    # Freed again: the check-in resumes where it stopped and ends identical.
    resumed = laptop.begin(delta).json()
    assert resumed["missing"] == missing[1:]
    laptop.send(delta, resumed["missing"])
    assert laptop.commit().status_code == 200
    assert file_sha256(server_layer(world)) == file_sha256(laptop.layer)


def test_the_reconciler_gives_back_a_slot_a_dead_broker_kept(
        world: BrokerWorld, tmp_path: Path) -> None:
    laptop = Laptop(world, tmp_path / "laptop", check_out(world))
    laptop.write(9 << 20, 0x71)
    delta = laptop.plan()
    laptop.begin(delta)
    world.fill()  # a reconciler pass: the transfer is live, its slot stays
    with world.ctx.uow(read_only=True) as uow:
        checkout_id = uow.offline_checkouts.active()[0].id
    assert [h for h, _ in transfer_slots(world) if h] == [f"checkin:{checkout_id}"]
    # The broker ended the transfer (as a commit does) and died before giving the slot back.
    with world.ctx.uow() as uow:
        uow.offline_checkouts.get(checkout_id).transfer_plan = None
        uow.commit()
    world.fill()
    assert [h for h, _ in transfer_slots(world) if h] == []
    assert offline_transfers.release_stale_slots(world.ctx) == 0  # nothing left to free
