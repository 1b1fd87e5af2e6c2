"""Scheduled roaming-profile maintenance (``services.profile_maintenance``, run by the
reconciler): long chains flattened with nothing lost, one broker at a time under the
profile's lease, never beside an open session, corrupt layers reported and left alone, and a
flatten that loses a compare-and-swap undone. Real qcow2 files on the fake driver, on SQLite
and PostgreSQL."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from deskpool.config import Settings
from deskpool.domain.errors import Conflict
from deskpool.domain.profiles import Layer, LayerState
from deskpool.drivers.fake import FakeDriver
from deskpool.images import profile_disks
from deskpool.images.profile_disks import sha256_of
from deskpool.reconciler.loop import Reconciler
from deskpool.services import profiles as profiles_module
from deskpool.services.context import ServiceContext
from deskpool.services.profile_maintenance import Flatten, ProfileMaintenance
from deskpool.services.profiles import ProfileService
from deskpool.store.access_models import Event
from deskpool.store.profiles import ProfileRow
from tests.functional import test_profiles as profile_world
from tests.functional.test_profiles import QUOTA, committed_path, desktop, holds, session_cycle

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "qemu-img", "qemu-io")),
    reason="needs e2fsprogs and qemu-utils")
fake = profile_world.fake
GENERATIONS = (2, 3, 4, 5, 6, 7)  # written at logoffs: generation g holds byte g at g MiB
MiB = 2**20


def settings(tmp_path: Path, database_url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, **kw)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[ServiceContext]:
    context = ServiceContext(settings(tmp_path, database_url))
    yield context
    context.close()


@pytest.fixture
def service(ctx: ServiceContext) -> ProfileService:
    """Profiles where the reconciler keeps them (the deployment's ``profile_dir``)."""
    return ProfileService(ctx, ctx.settings.resolved_profile_dir)


def long_chain(service: ProfileService, fake: FakeDriver, user: str = "ann") -> uuid.UUID:
    """``user``'s profile at generation 7, keeping 2 old ones: generations 1-4 may go."""
    service.ensure_profile(user, quota_bytes=QUOTA, keep_generations=2)
    vm = desktop(fake, f"desk-{user}")
    for generation in GENERATIONS:
        session_cycle(service, fake, vm, user, generation, generation * MiB)
    return vm


def snapshot(ctx: ServiceContext, user: str = "ann") -> tuple[Any, list[Layer]]:
    with ctx.uow(read_only=True) as uow:
        profile = uow.profiles.get(user)
        return (profile.generation, profile.layer_id), uow.profiles.layers(user)


def files_with_sums(layers: list[Layer]) -> dict[str, str]:
    return {layer.path: sha256_of(Path(layer.path)) for layer in layers}


def error_events(ctx: ServiceContext, kind: str) -> list[tuple[str | None, str]]:
    with ctx.uow(read_only=True) as uow:
        return [(e.user_name, e.message) for e in uow.session.scalars(
            select(Event).where(Event.kind == kind, Event.severity == "error"))]


def sees_every_generation(service: ProfileService, fake: FakeDriver, vm: uuid.UUID,
                          user: str = "ann") -> bool:
    """The user's next logon reads what each logoff wrote (and the chain checks clean)."""
    session = service.start_session(user, f"desk-{user}", fake, vm)
    try:
        return all(holds(session.path, g, g * MiB) for g in GENERATIONS)
    finally:
        service.end_session(session.layer_id, fake, vm)


def test_the_scheduled_run_flattens_a_long_chain_and_the_next_logon_sees_the_same_content(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    vm = long_chain(service, fake)
    (generation, top), before = snapshot(ctx)
    assert len([la for la in before if la.state is LayerState.COMMITTED]) == 7

    reconciler = Reconciler(ctx, workers=1)
    report = reconciler.run_pass()
    reconciler.close()

    assert not report.errors, report.errors
    assert "profile of ann flattened" in report.notes
    (generation_after, top_after), after = snapshot(ctx)
    assert (generation_after, top_after) == (generation, top)  # the same generation is current
    flat = [la for la in after if la.parent_id is None and la.state is LayerState.COMMITTED]
    assert [la.generation for la in flat] == [5]  # the oldest kept one, now standalone
    retired = [la for la in after if la.state is LayerState.FLATTENED]
    assert {la.generation for la in retired} == {1, 2, 3, 4, 5}
    assert not any(Path(la.path).exists() for la in retired)  # swept in the same run
    assert service.verify("ann") == []  # every committed layer matches its checksum
    assert sees_every_generation(service, fake, vm)
    with ctx.uow(read_only=True) as uow:  # and it was verified by the run
        assert uow.profiles.verified_at("ann") is not None


def test_a_disabled_schedule_changes_nothing(
        tmp_path: Path, database_url: str, fake: FakeDriver) -> None:
    ctx = ServiceContext(settings(tmp_path, database_url, profile_maintenance_interval_s=0))
    try:
        service = ProfileService(ctx, ctx.settings.resolved_profile_dir)
        long_chain(service, fake)
        before = snapshot(ctx)
        reconciler = Reconciler(ctx, workers=1)
        report = reconciler.run_pass()
        reconciler.close()
        assert snapshot(ctx) == before and not report.notes
        with ctx.uow(read_only=True) as uow:
            assert uow.profiles.verified_at("ann") is None  # not run at all
    finally:
        ctx.close()


def slow_convert(monkeypatch: pytest.MonkeyPatch, hold: Callable[[], None]) -> list[str]:
    """``disks.flatten`` (the long copy) calls ``hold()`` first; returns the targets copied."""
    original = profile_disks.flatten
    copied: list[str] = []

    def flatten(target: Path, into: Path, **kw: Any) -> Path:
        copied.append(str(target))
        hold()
        return original(target, into, **kw)

    monkeypatch.setattr(profile_disks, "flatten", flatten)
    return copied


def test_two_brokers_racing_flatten_a_profile_once(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext, tmp_path: Path,
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reconcilers, each with its own context on the one database, run their passes at
    the same moment; the copy takes long enough for them to overlap."""
    vm = long_chain(service, fake)
    other = ServiceContext(settings(tmp_path, database_url))
    copied = slow_convert(monkeypatch, lambda: threading.Event().wait(1.0))
    brokers = [Reconciler(ctx, workers=1), Reconciler(other, workers=1)]
    start = threading.Barrier(2)
    reports: list[Any] = [None, None]

    def run(i: int) -> None:
        start.wait()
        reports[i] = brokers[i].run_pass()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for broker in brokers:
        broker.close()
    other.close()

    assert all(r is not None and not r.errors for r in reports), reports
    assert sum("profile of ann flattened" in r.notes for r in reports) == 1
    assert len(copied) == 1  # the other one never even started copying
    _, after = snapshot(ctx)
    assert len([la for la in after if la.parent_id is None
                and la.state is LayerState.COMMITTED]) == 1
    assert len([la for la in after if (la.note or "").startswith("flattened")]) == 1
    assert sees_every_generation(service, fake, vm)


def test_a_profile_leased_by_another_broker_waits_until_its_lease_expires(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    long_chain(service, fake)
    now = datetime.now(UTC)
    with ctx.uow() as uow:  # a broker that took the lease, then died
        assert uow.profiles.take_maintenance("ann", "dead-broker", now + timedelta(seconds=30),
                                             now)
        uow.commit()
    live = ProfileMaintenance(ctx, service.store_dir, owner="live-broker")
    assert live.flatten("ann") is Flatten.BUSY
    assert live.run(flatten_limit=5, verify_limit=5).skipped == [("ann", Flatten.BUSY)]
    later = ProfileMaintenance(ctx, service.store_dir, owner="live-broker",
                               clock=lambda: datetime.now(UTC) + timedelta(minutes=1))
    assert later.flatten("ann") is Flatten.DONE  # the dead broker's lease ran out
    with ctx.uow(read_only=True) as uow:
        row = uow.session.get(ProfileRow, "ann")
        assert row is not None and row.maint_owner is None  # given back


def test_a_flatten_is_skipped_while_the_profile_is_in_use(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    vm = long_chain(service, fake)
    session = service.start_session("ann", "desk-ann", fake, vm)
    before = snapshot(ctx)
    sums = files_with_sums(before[1])

    report = Reconciler(ctx, workers=1).run_pass()

    assert "profile of ann not flattened: in use by a session" in report.notes
    assert snapshot(ctx) == before and files_with_sums(before[1]) == sums
    service.end_session(session.layer_id, fake, vm)
    assert service.flatten("ann")  # once the user logged off


def test_a_logon_during_the_copy_makes_the_flatten_give_up(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy runs while sessions may open; the swap then finds the session and stops."""
    vm = long_chain(service, fake)
    opened: list[Any] = []
    slow_convert(monkeypatch, lambda: opened.append(
        service.start_session("ann", "desk-ann", fake, vm)))
    before = snapshot(ctx)
    sums = files_with_sums(before[1])

    assert ProfileMaintenance(ctx, service.store_dir).flatten("ann") is Flatten.IN_USE

    (session,) = opened
    _, layers = snapshot(ctx)
    assert [la for la in layers if la.id != session.layer_id] == before[1]
    assert files_with_sums(before[1]) == sums
    assert sorted(p.name for p in (service.store_dir / "ann").iterdir()) == sorted(
        [Path(la.path).name for la in layers])  # its copy removed
    assert holds(session.path, 7, 7 * MiB) and holds(session.path, 2, 2 * MiB)


def test_no_session_opens_while_a_flatten_swaps(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch) -> None:
    vm = long_chain(service, fake)
    now = datetime.now(UTC)
    with ctx.uow() as uow:  # another broker is swapping a flattened base in
        assert uow.profiles.take_maintenance("ann", "b2", now + timedelta(seconds=30), now)
        assert uow.profiles.begin_swap("ann", "b2", now)
        uow.commit()
    monkeypatch.setattr(profiles_module, "ADMIT_WAIT_S", 0.5)
    with pytest.raises(Conflict, match="being flattened"):
        service.start_session("ann", "desk-ann", fake, vm)
    _, layers = snapshot(ctx)
    assert not [la for la in layers if la.state is LayerState.SESSION]  # nothing recorded
    with ctx.uow() as uow:  # the swap ended
        uow.profiles.release_maintenance("ann", "b2")
        uow.commit()
    assert service.start_session("ann", "desk-ann", fake, vm).base_generation == 7


def test_a_corrupt_layer_found_by_the_scheduled_verify_is_reported_and_left_alone(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)  # keeps 3: nothing to flatten
    vm = desktop(fake, "desk-ann")
    for generation in (2, 3):
        session_cycle(service, fake, vm, "ann", generation, generation * MiB)
    damaged = committed_path(service, "ann")
    with damaged.open("r+b") as handle:  # bit rot in the newest generation's data
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    before = snapshot(ctx)
    sums = files_with_sums(before[1])

    report = Reconciler(ctx, workers=1).run_pass()

    assert not report.errors, report.errors  # the pass itself did its work
    (problem,) = [n for n in report.notes if n.startswith("profile maintenance:")]
    assert "profile of ann" in problem and "generation 3" in problem, problem
    ((user, message),) = error_events(ctx, "profile-corrupt")
    assert user == "ann" and "profile of ann, generation 3" in message and "corrupt" in message
    assert snapshot(ctx) == before  # no row changed
    assert files_with_sums(before[1]) == sums  # no file deleted or rewritten


def test_verify_goes_round_the_profiles_oldest_verified_first(
        service: ProfileService, ctx: ServiceContext) -> None:
    for user in ("ann", "bob", "cy"):
        service.ensure_profile(user, quota_bytes=QUOTA)
    maintenance = ProfileMaintenance(ctx, service.store_dir)
    runs = [maintenance.run(flatten_limit=0, verify_limit=2).verified for _ in range(3)]
    assert runs == [["ann", "bob"], ["cy", "ann"], ["bob", "cy"]]


def sabotage_retired(ctx: ServiceContext, user: str) -> None:
    """Another broker (its lease long expired, say) retired a layer meanwhile."""
    with ctx.uow() as uow:
        oldest = uow.profiles.layers(user)[0]
        assert uow.profiles.set_layer_state(oldest.id, LayerState.COMMITTED,
                                            LayerState.FLATTENED)
        uow.commit()


def sabotage_lease(ctx: ServiceContext, user: str) -> None:
    """Our lease expired and another broker took it."""
    with ctx.uow() as uow:
        uow.session.execute(update(ProfileRow).where(ProfileRow.user_name == user)
                            .values(maint_owner="other", maint_swap=False))
        uow.commit()


def sabotage_child(ctx: ServiceContext, user: str) -> None:
    """The layer to rebase stopped being a committed one (an admin's repair, say)."""
    with ctx.uow() as uow:
        child = next(la for la in uow.profiles.layers(user) if la.generation == 6)
        assert uow.profiles.set_layer_state(child.id, LayerState.COMMITTED,
                                            LayerState.UNCLEAN, note="set aside")
        uow.commit()


@pytest.mark.parametrize("sabotage", [sabotage_retired, sabotage_lease, sabotage_child])
def test_a_flatten_that_loses_a_compare_and_swap_is_undone(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch,
        sabotage: Callable[[ServiceContext, str], None]) -> None:
    vm = long_chain(service, fake)
    (current, layers_before) = snapshot(ctx)
    sums = files_with_sums(layers_before)
    original = profile_disks.rebase_header
    rebased: list[tuple[str, str]] = []

    def rebase_then_race(child: Path, base: Path) -> None:
        original(child, base)
        rebased.append((child.name, base.name))
        if len(rebased) == 1:  # after our rebase, before our commit
            sabotage(ctx, "ann")

    monkeypatch.setattr(profile_disks, "rebase_header", rebase_then_race)

    assert ProfileMaintenance(ctx, service.store_dir).flatten("ann") is Flatten.LOST_RACE

    assert len(rebased) == 2 and rebased[1][0] == rebased[0][0]  # the child, put back
    assert files_with_sums(layers_before) == sums  # every file byte for byte as before
    (current_after, layers_after) = snapshot(ctx)
    assert current_after == current
    assert len(layers_after) == len(layers_before)  # no flattened layer recorded
    assert {la.id: la.parent_id for la in layers_after} == {
        la.id: la.parent_id for la in layers_before}
    assert sorted(p.name for p in (service.store_dir / "ann").iterdir()) == sorted(
        Path(la.path).name for la in layers_before)  # its copy removed, nothing else
    assert sees_every_generation(service, fake, vm)


def test_a_failed_flatten_is_an_error_event_and_changes_nothing(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch) -> None:
    vm = long_chain(service, fake)
    before = snapshot(ctx)
    sums = files_with_sums(before[1])

    def broken(*_a: Any, **_k: Any) -> Path:
        raise profile_disks.ProfileDiskError("flattening a profile chain: qemu-img: No space "
                                             "left on device")

    monkeypatch.setattr(profile_disks, "flatten", broken)
    report = Reconciler(ctx, workers=1).run_pass()

    assert any("flattening the profile of ann failed" in n and "No space" in n
               for n in report.notes), report.notes
    ((user, message),) = error_events(ctx, "profile-maintenance-failed")
    assert user == "ann" and "No space left on device" in message
    assert snapshot(ctx) == before and files_with_sums(before[1]) == sums
    monkeypatch.undo()
    assert sees_every_generation(service, fake, vm)


def test_an_admins_verify_waits_for_no_flatten(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    """A flatten rebasing a layer would read as a mismatch: verify needs the lease too."""
    long_chain(service, fake)
    now = datetime.now(UTC)
    with ctx.uow() as uow:
        assert uow.profiles.take_maintenance("ann", "flattener", now + timedelta(seconds=30),
                                             now)
        uow.commit()
    with pytest.raises(Conflict, match="another broker"):
        service.verify("ann")
    assert error_events(ctx, "profile-corrupt") == []
    with ctx.uow() as uow:
        uow.profiles.release_maintenance("ann", "flattener")
        uow.commit()
    assert service.verify("ann") == []
