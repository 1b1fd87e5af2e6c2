"""Roaming profiles across hosts, on two fake hosts: a logon on a host that lacks some of the
user's chain copies only those layers (their bytes counted), a second logon copies nothing,
a copy cut by a killed process is recovered, and the broker prefers the host that holds the
user's latest generation. The layers are real qcow2 files; the copies go through the fake
drivers' volume streams (``read_volume`` / ``receive_volume``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.domain.errors import DriverError
from deskpool.domain.profile_hosts import HoldState, layer_volume_name
from deskpool.domain.profiles import LayerState
from deskpool.domain.users import Identity
from deskpool.drivers.base import partial_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.profile_copies import ProfileCopies
from tests.broker_world import BrokerWorld, make_world
from tests.functional.test_profile_logon import Hook, hook, log_off_and_recycle
from tests.functional.test_profile_views import cli

__all__ = ["hook"]  # the fixture, shared with test_profile_logon
ANN = Identity(name="ann", display_name="Ann", source="local", groups=frozenset({"staff"}))


class TwoHosts:
    def __init__(self, w: BrokerWorld) -> None:
        self.w = w
        with w.ctx.uow(read_only=True) as uow:
            self.h1 = uow.hosts.get_by_name("h1").id
            self.h2 = uow.hosts.get_by_name("h2").id
        second = open_driver("fake://second")
        assert isinstance(second, FakeDriver)
        self.fake2 = second

    def chain_files(self) -> dict[uuid.UUID, int]:
        """Each committed layer of ann -> its file's size in the profile store."""
        with self.w.ctx.uow(read_only=True) as uow:
            return {la.id: Path(la.path).stat().st_size for la in uow.profiles.layers("ann")
                    if la.state is LayerState.COMMITTED}

    def held_by(self, host_id: uuid.UUID) -> set[uuid.UUID]:
        with self.w.ctx.uow(read_only=True) as uow:
            return {r.layer_id for r in uow.profile_holders.records(state=HoldState.HELD)
                    if r.host_id == host_id}

    def logon(self, pool: str) -> uuid.UUID:
        handover = Broker(self.w.ctx).connect(ANN, pool)
        assert handover.status == "ready", handover.message
        assert handover.desktop_id is not None
        return handover.desktop_id

    def copied_events(self) -> list[str]:
        """The admin's ``profile-copied`` events for ann, newest first."""
        with self.w.ctx.uow(read_only=True) as uow:
            return [e.message for e in uow.events.recent(50, user="ann",
                                                         kind="profile-copied")]


@pytest.fixture()
def two(tmp_path: Path) -> Iterator[TwoHosts]:
    w = make_world(tmp_path)
    HostService(w.ctx).add("h2", "fake://second")
    pools = PoolService(w.ctx)
    from deskpool.domain.pools import PoolSpec
    for name, host in (("on-a", "h1"), ("on-b", "h2")):
        pools.create(PoolSpec(name=name, template="golden", spare=1, max_size=1,
                              naming_pattern=f"{name}-{{n:02}}", roaming_profiles=True),
                     host=host)
        EntitlementService(w.ctx).grant(name, "group", "staff")
    w.fill(passes=2)
    yield TwoHosts(w)
    w.ctx.close()
    forget_fake_hosts()


def test_logon_on_another_host_copies_only_the_missing_layers_then_nothing(
        two: TwoHosts, hook: Hook) -> None:
    # Generation 1 made at the first logon on host A, generation 2 committed there.
    log_off_and_recycle(two.w, two.logon("on-a"))
    files = two.chain_files()
    assert len(files) == 2 and two.held_by(two.h1) == set(files)
    assert two.held_by(two.h2) == set()

    # On host B: both layers cross, their bytes exactly.
    desktop = two.logon("on-b")
    copy = ProfileCopies(two.w.ctx)
    assert two.held_by(two.h2) == set(files)
    assert {layer_volume_name(i) for i in files} <= set(two.fake2.list_volumes())
    (said,) = two.copied_events()
    assert f"2 layer(s) ({sum(files.values())} bytes)" in said
    for layer_id, size in files.items():
        volume = two.fake2.volume_info(layer_volume_name(layer_id))
        assert volume.allocation_bytes == size
    assert copy.copies() == []  # nothing left in flight
    log_off_and_recycle(two.w, desktop)  # generation 3 written on host B: held there
    after = two.chain_files()
    (third,) = set(after) - set(files)
    assert two.held_by(two.h2) == set(after) and third not in two.held_by(two.h1)

    # Back on host B: it holds the whole chain, nothing crosses.
    log_off_and_recycle(two.w, two.logon("on-b"))
    assert len(two.copied_events()) == 1
    # On host A: only the generations B wrote cross (A holds 1 and 2).
    fourth = set(two.chain_files()) - set(after)
    two.logon("on-a")
    newest = two.copied_events()[0]  # newest first
    assert len(two.copied_events()) == 2
    crossed = {third, *fourth}
    assert f"{len(crossed)} layer(s) ({sum(two.chain_files()[i] for i in crossed)} bytes)" \
        in newest
    assert crossed <= two.held_by(two.h1)


def test_a_copy_cut_by_a_killed_process_is_recovered_and_then_completes(
        two: TwoHosts, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    log_off_and_recycle(two.w, two.logon("on-a"))
    files = two.chain_files()
    # The broker is killed half way through the first layer's copy: nothing it would do on
    # the way out (dropping its record) runs, the partial volume stays on host B. (The
    # fake's cut raises a driver error here, so this logon itself goes on.)
    two.fake2.fail_next("receive_volume.cut", DriverError("killed"))
    monkeypatch.setattr(ProfileCopies, "_forget_copy", lambda *_a: None)
    handover = Broker(two.w.ctx).connect(ANN, "on-b")
    assert handover.status == "ready"  # a temporary home: the profile was unavailable
    partials = [v for v in two.fake2.list_volumes() if v.endswith(".part")]
    assert len(partials) == 1
    (inflight,) = ProfileCopies(two.w.ctx).copies()
    assert inflight.host_id == two.h2 and inflight.state is HoldState.COPYING
    assert inflight.bytes_total == files[inflight.layer_id]  # the oldest layer first
    assert inflight.bytes_done < inflight.bytes_total
    assert inflight.layer_id == min(files, key=lambda i: _generation(two, i))
    assert two.held_by(two.h2) == set()  # no record claims B holds half a layer
    assert partials == [partial_volume_name(layer_volume_name(inflight.layer_id))]
    # The admin sees the copy in flight, and which hosts hold which generation.
    shown = cli(two.w, "profile", "copies")
    assert shown.returncode == 0, shown.stderr
    assert "ann" in shown.stdout and "h2" in shown.stdout
    assert f"of {inflight.bytes_total / 2**20:.1f}" in shown.stdout
    held = cli(two.w, "profile", "hosts", "ann")
    assert held.returncode == 0, held.stderr
    assert "generation 1: h1" in held.stdout and "generation 2: h1" in held.stdout

    # A recovery before the copy counts as dead leaves it alone; after, removes both.
    assert ProfileCopies(two.w.ctx).recover() == []
    later = datetime.now(UTC) + timedelta(minutes=5)
    (removed,) = ProfileCopies(two.w.ctx).recover(now=later)
    assert removed.layer_id == inflight.layer_id
    assert not [v for v in two.fake2.list_volumes() if v.endswith(".part")]
    assert ProfileCopies(two.w.ctx).copies() == []

    # The next logon on host B copies the whole chain, checked.
    assert handover.desktop_id is not None
    log_off_and_recycle(two.w, handover.desktop_id)
    two.logon("on-b")
    assert set(files) <= two.held_by(two.h2)


def _generation(two: TwoHosts, layer_id: uuid.UUID) -> int:
    with two.w.ctx.uow(read_only=True) as uow:
        return uow.profiles.layer(layer_id).generation


def test_a_rerun_by_the_same_broker_restarts_a_cut_copy_cleanly(
        two: TwoHosts, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    log_off_and_recycle(two.w, two.logon("on-a"))
    two.fake2.fail_next("receive_volume.cut", RuntimeError("killed"))
    with monkeypatch.context() as patched:
        patched.setattr(ProfileCopies, "_forget_copy", lambda *_a: None)
        with two.w.ctx.uow(read_only=True) as uow:
            top = uow.profiles.get("ann").layer_id
        assert top is not None
        with pytest.raises(RuntimeError, match="killed"):
            ProfileCopies(two.w.ctx).bring_chain("ann", top, two.h2)
    # No recovery ran: the same copier takes its own record over and writes from the start.
    result = ProfileCopies(two.w.ctx).bring_chain("ann", top, two.h2)
    assert result.bytes_copied == sum(two.chain_files().values())
    assert not [v for v in two.fake2.list_volumes() if v.endswith(".part")]
    assert two.held_by(two.h2) == set(two.chain_files())


def test_the_broker_prefers_a_desktop_on_the_host_holding_the_latest_generation(
        tmp_path: Path, hook: Hook) -> None:
    w = make_world(tmp_path)
    try:
        HostService(w.ctx).add("h2", "fake://second")
        from deskpool.domain.pools import PoolSpec
        PoolService(w.ctx).create(PoolSpec(
            name="both", template="golden", spare=4, max_size=4,
            naming_pattern="both-{n:02}", roaming_profiles=True))
        EntitlementService(w.ctx).grant("both", "group", "staff")
        w.fill(passes=2)
        # bob takes the first desktop by name, so ann's profile is made and committed on
        # the desktop after it, on the other host.
        bob = Identity(name="bob", display_name="Bob", source="local",
                       groups=frozenset({"staff"}))
        first_by_name = Broker(w.ctx).connect(bob, "both")
        anns = Broker(w.ctx).connect(ANN, "both")
        assert first_by_name.desktop_id is not None and anns.desktop_id is not None
        with w.ctx.uow(read_only=True) as uow:
            bob_host = uow.desktops.get(first_by_name.desktop_id).host_id
            ann_host = uow.desktops.get(anns.desktop_id).host_id
        assert bob_host != ann_host, "the pool spreads: its first two desktops differ"
        log_off_and_recycle(w, anns.desktop_id)
        log_off_and_recycle(w, first_by_name.desktop_id)
        assert ProfileCopies(w.ctx).preferred_hosts("ann") == {ann_host}
        # The first free desktop by name is on bob's host again; ann still lands on hers.
        again = Broker(w.ctx).connect(ANN, "both")
        assert again.desktop_id is not None
        with w.ctx.uow(read_only=True) as uow:
            assert uow.desktops.get(again.desktop_id).host_id == ann_host
            assert again.desktop != first_by_name.desktop
        assert TwoHosts(w).copied_events() == []  # nothing had to cross
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_a_desktop_made_for_the_user_goes_to_the_host_holding_their_profile(
        tmp_path: Path, hook: Hook) -> None:
    w = make_world(tmp_path)
    try:
        HostService(w.ctx).add("h2", "fake://second")
        from deskpool.domain.pools import PoolSpec
        PoolService(w.ctx).create(PoolSpec(
            name="grow", template="golden", spare=0, max_size=2,
            naming_pattern="grow-{n:02}", roaming_profiles=True))
        EntitlementService(w.ctx).grant("grow", "group", "staff")
        two = TwoHosts(w)
        # ann's profile, held by h2 only (its second host by name: equal empty hosts go to
        # the first by name otherwise).
        profile = ProfileCopies(w.ctx)
        from deskpool.services.profiles import ProfileService
        made = ProfileService(w.ctx, w.ctx.settings.resolved_profile_dir).ensure_profile("ann")
        assert made.layer_id is not None
        assert profile.register(made.layer_id, two.h2, two.fake2)
        pending = Broker(w.ctx).connect(ANN, "grow")
        assert pending.status != "ready"  # no desktop yet: one is being made for ann
        with w.ctx.uow(read_only=True) as uow:
            (desktop,) = [d for d in uow.desktops.list() if d.assigned_user == "ann"]
            assert desktop.host_id == two.h2
            assert "holds the user's profile" in (desktop.placement_reason or "")
    finally:
        w.ctx.close()
        forget_fake_hosts()


def test_a_flatten_forgets_the_hosts_copies_of_the_layer_it_rebased(
        two: TwoHosts, hook: Hook) -> None:
    """A flatten rewrites the header of the child it rebases onto the new base: the copies
    hosts hold of it are no longer that layer, so their records go and the child is read
    from the profile store; a later logon elsewhere copies no stale bytes."""
    for _ in range(2):
        log_off_and_recycle(two.w, two.logon("on-a"))  # generations 1-3, held by host A
    with two.w.ctx.uow() as uow:
        uow.profiles.set_keep("ann", 1)
        uow.commit()
    from deskpool.services.profiles import ProfileService
    service = ProfileService(two.w.ctx, two.w.ctx.settings.resolved_profile_dir)
    with two.w.ctx.uow(read_only=True) as uow:
        top = uow.profiles.get("ann").layer_id
    assert top in two.held_by(two.h1)
    held_before = two.held_by(two.h1)
    assert service.flatten("ann")
    assert top not in two.held_by(two.h1)  # the rebased child: its copies are stale
    assert layer_volume_name(top) not in two.w.fake.list_volumes()  # and deleted
    with two.w.ctx.uow(read_only=True) as uow:
        flattened = {la.id for la in uow.profiles.layers("ann")
                     if la.state is LayerState.FLATTENED}
    assert flattened and flattened <= held_before
    service.sweep("ann")  # the flattened layers' files go, and so do hosts' copies of them
    assert not flattened & two.held_by(two.h1)
    assert not {layer_volume_name(i) for i in flattened} & set(two.w.fake.list_volumes())
    log_off_and_recycle(two.w, two.logon("on-b"))
    assert two.copied_events() == []  # base and child are in the store every host reaches


def test_a_copy_holds_a_transfer_slot_on_both_hosts_and_records_its_progress(
        two: TwoHosts, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import select

    from deskpool.services import profile_copies
    from deskpool.store.models import HostSlot

    log_off_and_recycle(two.w, two.logon("on-a"))
    with two.w.ctx.uow(read_only=True) as uow:
        top = uow.profiles.get("ann").layer_id
    assert top is not None
    copies = ProfileCopies(two.w.ctx, chunk_bytes=64 * 1024)
    monkeypatch.setattr(profile_copies, "PROGRESS_EVERY_S", 0.0)
    seen: list[tuple[uuid.UUID, int, set[uuid.UUID]]] = []
    receive_chunk = two.fake2.receive_chunk

    def watched(name: str, chunk: bytes, size: int) -> int:
        """What the database says while each chunk arrives."""
        layer_id = uuid.UUID(name.removesuffix(".qcow2"))
        with two.w.ctx.uow(read_only=True) as uow:
            record = uow.profile_holders.find(layer_id, two.h2)
            holders = {slot.host_id for slot in uow.session.scalars(
                select(HostSlot).where(HostSlot.kind == "transfer",
                                       HostSlot.holder == copies.copier))}
        assert record is not None and record.state is HoldState.COPYING
        seen.append((layer_id, record.bytes_done, holders))
        return receive_chunk(name, chunk, size)

    monkeypatch.setattr(two.fake2, "receive_chunk", watched)
    result = copies.bring_chain("ann", top, two.h2)
    assert result.bytes_copied == sum(two.chain_files().values())
    assert len(seen) > 4  # small chunks: many progress writes
    assert all(holders == {two.h1, two.h2} for _layer, _done, holders in seen)
    for layer_id in {layer for layer, _done, _holders in seen}:  # both layers, each growing
        done = [d for layer, d, _holders in seen if layer == layer_id]
        assert done == sorted(done) and done[0] == 0
    assert len({layer for layer, _done, _holders in seen}) == 2 and max(
        d for _layer, d, _holders in seen) > 64 * 1024
    with two.w.ctx.uow(read_only=True) as uow:
        still = list(uow.session.scalars(select(HostSlot).where(
            HostSlot.kind == "transfer", HostSlot.holder == copies.copier)))
    assert still == []  # both slots given back


def test_the_admin_api_shows_which_hosts_hold_a_profile_and_the_copies_in_flight(
        two: TwoHosts, hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = two.w.client(two.w.user("root-admin", admin=True))
    log_off_and_recycle(two.w, two.logon("on-a"))
    assert admin.get("/api/v1/admin/profiles/ann/hosts").json() == {
        "user": "ann", "generations": [{"generation": 1, "hosts": ["h1"]},
                                       {"generation": 2, "hosts": ["h1"]}]}
    assert admin.get("/api/v1/admin/profile-copies").json() == []
    seen: list[list[dict[str, object]]] = []
    receive_chunk = two.fake2.receive_chunk

    def watched(name: str, chunk: bytes, size: int) -> int:
        seen.append(admin.get("/api/v1/admin/profile-copies").json())
        return receive_chunk(name, chunk, size)

    monkeypatch.setattr(two.fake2, "receive_chunk", watched)
    two.logon("on-b")
    (first, *_rest) = [copies for copies in seen if copies]
    (copy,) = first
    assert (copy["user"], copy["generation"], copy["host"]) == ("ann", 1, "h2")
    assert copy["bytes_total"] == two.chain_files()[uuid.UUID(str(copy["layer_id"]))]
    assert admin.get("/api/v1/admin/profile-copies").json() == []
    shown = admin.get("/api/v1/admin/profiles/ann").json()
    assert shown["latest_on"] == ["h1", "h2"]
    assert [p["latest_on"] for p in admin.get("/api/v1/admin/profiles").json()] == [
        ["h1", "h2"]]
    assert admin.get("/api/v1/admin/profiles/nobody/hosts").status_code == 404
    ann = two.w.client(two.w.user("ann2", groups=("staff",)))
    assert ann.get("/api/v1/admin/profile-copies").status_code == 403
