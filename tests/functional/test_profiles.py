"""Roaming profiles end to end on the fake driver with real qcow2 files (mkfs.ext4,
qemu-img, qemu-io as the guest's writes), on SQLite and PostgreSQL: commit at logoff, two
racing sessions, a crash between detach and commit, a disk the guest will not release, a
corrupt session layer, retention, flattening and rollback."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import CloneMode, VmMetadata, VmSpec
from deskpool.domain.profiles import LayerState, disk_serial
from deskpool.drivers.fake import FakeDriver
from deskpool.images.profile_disks import sha256_of
from deskpool.services.context import ServiceContext
from deskpool.services.profiles import ProfileService, attached_serials

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "qemu-img", "qemu-io")),
    reason="needs e2fsprogs and qemu-utils")
MiB = 2**20
QUOTA = 64 * MiB


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[ServiceContext]:
    context = ServiceContext(Settings(data_dir=tmp_path / "data", database_url=database_url))
    yield context
    context.close()


@pytest.fixture
def service(ctx: ServiceContext, tmp_path: Path) -> ProfileService:
    skel = tmp_path / "skel"
    skel.mkdir()
    (skel / ".bashrc").write_text("# deskpool\n")
    return ProfileService(ctx, tmp_path / "profiles", skeleton=skel,
                          extra_exclusions=[".local/share/Trash"])


@pytest.fixture
def fake(tmp_path: Path) -> FakeDriver:
    driver = FakeDriver()
    image = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    driver.import_volume("base.qcow2", image)
    return driver


def desktop(fake: FakeDriver, name: str) -> uuid.UUID:
    """A running fake desktop whose guest OS answers (and so releases unplugged disks)."""
    identity = DesktopIdentity(uuid.uuid4(), name, new_mac(), new_machine_id())
    spec = VmSpec(vm_id=identity.desktop_id, name=name, base_volume="base.qcow2",
                  clone_mode=CloneMode.LINKED, mac=identity.mac,
                  metadata=VmMetadata(desktop_id=identity.desktop_id, desktop_name=name),
                  identity_text=identity.to_guest_text())
    fake.create_vm(spec)
    fake.start_vm(spec.vm_id)
    return spec.vm_id


def guest_writes(path: Path, byte: int, offset: int, length: int = 4096) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte:#x} {offset} {length}",
                    str(path)], check=True, capture_output=True)


def holds(path: Path, byte: int, offset: int, length: int = 4096) -> bool:
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c",
                           f"read -P {byte:#x} {offset} {length}", str(path)],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


def committed_path(service: ProfileService, user: str) -> Path:
    with service._ctx.uow(read_only=True) as uow:
        profile = uow.profiles.get(user)
        assert profile.layer_id is not None
        return Path(uow.profiles.layer(profile.layer_id).path)


def event_kinds(ctx: ServiceContext, user: str) -> list[str]:
    with ctx.uow(read_only=True) as uow:
        return [event.kind for event in uow.events.recent(50, user=user)]


def session_cycle(service: ProfileService, fake: FakeDriver, vm: uuid.UUID, user: str,
                  byte: int, offset: int) -> int:
    session = service.start_session(user, "desk", fake, vm)
    guest_writes(session.path, byte, offset)
    logoff = service.end_session(session.layer_id, fake, vm)
    assert logoff.committed
    return logoff.generation


def test_logoff_commits_the_session_layer_and_the_next_desktop_sees_it(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    profile = service.ensure_profile("ann", owner=(2001, 2001), quota_bytes=QUOTA)
    assert profile.generation == 1
    assert service.ensure_profile("ann", quota_bytes=QUOTA) == profile  # made once
    first = committed_path(service, "ann")
    first_sum = sha256_of(first)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")

    session = service.start_session("ann", "desk-a", fake, vm_a)
    assert fake.attached_disks(vm_a) == {session.serial: str(session.path)}
    assert session.serial == disk_serial(session.layer_id) and session.base_generation == 1
    assert session.exclusions == (".cache", ".local/share/Trash")
    guest_writes(session.path, 0xA1, 10 * MiB)
    logoff = service.end_session(session.layer_id, fake, vm_a)

    assert (logoff.committed, logoff.generation) == (True, 2)
    assert fake.attached_disks(vm_a) == {}
    assert committed_path(service, "ann") == session.path
    assert sha256_of(first) == first_sum  # the old generation was never written
    with ctx.uow(read_only=True) as uow:
        layer = uow.profiles.layer(session.layer_id)
    assert layer.state is LayerState.COMMITTED and layer.sha256 == sha256_of(session.path)
    assert "profile-committed" in event_kinds(ctx, "ann")

    on_b = service.start_session("ann", "desk-b", fake, vm_b)
    assert holds(on_b.path, 0xA1, 10 * MiB)  # logon copied nothing, yet the file is there
    assert on_b.base_generation == 2


def test_a_user_without_a_profile_gets_a_clear_error(service: ProfileService,
                                                      fake: FakeDriver) -> None:
    with pytest.raises(NotFound, match="bob has no profile"):
        service.start_session("bob", "desk-a", fake, desktop(fake, "desk-a"))


def test_of_two_racing_sessions_one_commits_and_the_other_is_merged_into_it(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")
    on_a = service.start_session("ann", "desk-a", fake, vm_a)
    on_b = service.start_session("ann", "desk-b", fake, vm_b)
    guest_writes(on_a.path, 0xAA, 5 * MiB)
    guest_writes(on_b.path, 0xBB, 6 * MiB)  # free blocks: no file of B changed

    assert service.end_session(on_a.layer_id, fake, vm_a).committed
    second = service.end_session(on_b.layer_id, fake, vm_b)

    assert second.committed and second.generation == 3 and second.conflicts == ()
    merged = committed_path(service, "ann")
    assert merged not in (on_a.path, on_b.path)
    assert holds(merged, 0xAA, 5 * MiB)  # an overlay on A's generation
    with ctx.uow(read_only=True) as uow:
        assert uow.profiles.layer(on_b.layer_id).state is LayerState.MERGED
    assert "profile-merged" in event_kinds(ctx, "ann")
    with pytest.raises(Conflict, match="not an open session"):
        service.end_session(on_b.layer_id, fake, vm_b)


def test_a_crash_between_detach_and_commit_leaves_the_old_generation(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext, tmp_path: Path) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    old = committed_path(service, "ann")
    old_sum = sha256_of(old)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")
    crashed = service.start_session("ann", "desk-a", fake, vm_a)
    live = service.start_session("ann", "desk-b", fake, vm_b)
    guest_writes(crashed.path, 0xCC, 7 * MiB)
    fake.detach_disk(vm_a, crashed.serial)  # the broker detached, then died

    restarted = ProfileService(ctx, tmp_path / "profiles")
    soon = datetime.now(UTC) + timedelta(seconds=5)
    recovered = restarted.recover_sessions(attached_serials([fake]), started_before=soon)

    assert [layer.id for layer in recovered] == [crashed.layer_id]  # desk-b still holds its
    with ctx.uow(read_only=True) as uow:
        profile = uow.profiles.get("ann")
        assert uow.profiles.layer(crashed.layer_id).state is LayerState.UNCLEAN
        assert uow.profiles.layer(live.layer_id).state is LayerState.SESSION
    assert profile.generation == 1 and committed_path(service, "ann") == old
    assert sha256_of(old) == old_sum
    # A recovery that runs during a hand-over leaves a just-made layer alone.
    assert restarted.recover_sessions(set()) == []


def test_a_disk_the_guest_will_not_release_is_never_committed(
        service: ProfileService, fake: FakeDriver) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    session = service.start_session("ann", "desk-a", fake, vm)
    fake.guest_holds_disks(vm)
    logoff = service.end_session(session.layer_id, fake, vm, detach_timeout_s=0.1)
    assert not logoff.committed and logoff.reason and "not released" in logoff.reason
    assert logoff.generation == 1


def test_a_layer_whose_desktop_restarted_without_it_is_never_committed(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    """Found by bench/r4_profile_cuts.py: QEMU killed mid-write, the desktop started again
    (the disk, plugged in live only, went with the old QEMU), its guest answers the logoff
    hook ("no profile" mounted) and the detach of a disk no longer there succeeded, so the
    torn layer was committed: a profile neither old nor new, e2fsck unclean."""
    service.ensure_profile("ann", quota_bytes=QUOTA)
    old = committed_path(service, "ann")
    vm = desktop(fake, "desk-a")
    session = service.start_session("ann", "desk-a", fake, vm)
    guest_writes(session.path, 0xAB, 3 * MiB)  # part of a write-back, then QEMU dies
    fake.stop_vm(vm, force=True)
    fake.start_vm(vm)

    logoff = service.end_session(session.layer_id, fake, vm)

    assert not logoff.committed and logoff.generation == 1
    assert logoff.reason is not None and "no longer held the disk" in logoff.reason
    assert committed_path(service, "ann") == old
    with ctx.uow(read_only=True) as uow:
        assert uow.profiles.layer(session.layer_id).state is LayerState.UNCLEAN


def test_a_corrupt_session_layer_is_set_aside(service: ProfileService,
                                              fake: FakeDriver) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    session = service.start_session("ann", "desk-a", fake, vm)
    guest_writes(session.path, 0x11, 0, 65536)
    with session.path.open("r+b") as handle:  # a cut write-back: metadata scribbled over
        handle.seek(0x30000)
        handle.write(b"\xff" * 65536)
    logoff = service.end_session(session.layer_id, fake, vm)
    assert not logoff.committed and logoff.reason and "failed its check" in logoff.reason


def test_a_failed_attach_sets_the_layer_aside_and_says_why(service: ProfileService,
                                                          fake: FakeDriver,
                                                          ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    fake.stop_vm(vm, force=True)
    with pytest.raises(Exception, match="not running"):
        service.start_session("ann", "desk-a", fake, vm)
    with ctx.uow(read_only=True) as uow:
        states = [layer.state for layer in uow.profiles.layers("ann")]
    assert states == [LayerState.COMMITTED, LayerState.UNCLEAN]


def test_rollback_makes_a_new_generation_and_keeps_the_ones_between(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA, keep_generations=2)
    vm = desktop(fake, "desk-a")
    for generation in (2, 3, 4, 5):
        assert session_cycle(service, fake, vm, "ann", generation, generation * MiB) == generation
    with pytest.raises(InvalidInput, match="not kept"):
        service.rollback("ann", 2, actor="admin")

    profile = service.rollback("ann", 3, actor="admin")

    assert profile.generation == 6
    now = committed_path(service, "ann")
    assert holds(now, 2, 2 * MiB) and holds(now, 3, 3 * MiB)
    assert not holds(now, 4, 4 * MiB) and not holds(now, 5, 5 * MiB)
    profile = service.rollback("ann", 5, actor="admin")  # the later ones are still there
    assert profile.generation == 7 and holds(committed_path(service, "ann"), 5, 5 * MiB)
    assert "profile-rolled-back" in event_kinds(ctx, "ann")


def test_a_session_open_during_a_rollback_does_not_commit_over_it(
        service: ProfileService, fake: FakeDriver) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    session_cycle(service, fake, vm, "ann", 0x22, 2 * MiB)
    session = service.start_session("ann", "desk-a", fake, vm)
    service.rollback("ann", 1, actor="admin")
    assert not service.end_session(session.layer_id, fake, vm).committed


def test_flatten_merges_old_generations_and_sweep_removes_their_files(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA, keep_generations=2)
    vm = desktop(fake, "desk-a")
    for generation in (2, 3, 4, 5, 6):
        session_cycle(service, fake, vm, "ann", generation, generation * MiB)
    open_session = service.start_session("ann", "desk-a", fake, vm)
    assert not service.flatten("ann")  # never while a session reads the chain
    service.end_session(open_session.layer_id, fake, vm)  # generation 7: keeps 5..7

    assert service.flatten("ann")
    removed = service.sweep("ann")

    with ctx.uow(read_only=True) as uow:
        layers = uow.profiles.layers("ann")
    flat = [layer for layer in layers if layer.parent_id is None
            and layer.state is LayerState.COMMITTED]
    assert len(flat) == 1 and flat[0].generation == 5
    assert {layer.generation for layer in layers if layer.state is LayerState.FLATTENED} == {
        1, 2, 3, 4, 5}
    assert len(removed) == 5 and not any(path.exists() for path in removed)
    top = committed_path(service, "ann")
    assert all(holds(top, g, g * MiB) for g in (2, 3, 4, 5, 6))
    assert service.rollback("ann", 5, actor="admin").generation == 8
    assert not holds(committed_path(service, "ann"), 6, 6 * MiB)
    assert holds(committed_path(service, "ann"), 4, 4 * MiB)


def test_verify_reports_a_committed_layer_whose_checksum_changed(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    session_cycle(service, fake, desktop(fake, "desk-a"), "ann", 0x44, 3 * MiB)
    assert service.verify("ann") == []
    damaged = committed_path(service, "ann")
    with damaged.open("r+b") as handle:  # bit rot in the newest generation's data
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    problems = service.verify("ann")
    assert len(problems) == 1 and "generation 2" in problems[0] and "corrupt" in problems[0]
    assert "profile-corrupt" in event_kinds(ctx, "ann")


def test_sweep_removes_stray_files_only_once_they_are_old(service: ProfileService,
                                                          tmp_path: Path) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    user_dir = tmp_path / "profiles" / "ann"
    old, fresh = user_dir / "crashed.qcow2.partial", user_dir / f"{uuid.uuid4()}.qcow2"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    long_ago = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    os.utime(old, (long_ago, long_ago))
    assert service.sweep("ann") == [old]
    assert fresh.exists() and committed_path(service, "ann").exists()


class Killed(BaseException):
    """The broker process dies here (nothing of it runs after, not even ``except``)."""


def test_a_broker_killed_at_any_step_of_logoff_leaves_exactly_old_or_new(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deskpool.images import profile_disks
    from deskpool.store.db import UnitOfWork
    from deskpool.store.profiles import ProfileRepository

    clock = {"n": 0, "crash_at": -1}

    def tick() -> None:
        clock["n"] += 1
        if clock["n"] == clock["crash_at"]:
            raise Killed

    def around(original: object) -> object:
        def wrapped(*args: object, **kwargs: object) -> object:
            tick()
            result = original(*args, **kwargs)  # type: ignore[operator]
            tick()
            return result
        return wrapped

    for name in ("check_layer", "sha256_of", "allocated_bytes"):
        monkeypatch.setattr(profile_disks, name, around(getattr(profile_disks, name)))
    for cls, name in ((ProfileRepository, "commit_generation"),
                      (ProfileRepository, "set_layer_state"), (UnitOfWork, "commit")):
        monkeypatch.setattr(cls, name, around(getattr(cls, name)))
    monkeypatch.setattr(fake, "detach_disk", around(fake.detach_disk))

    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    outcomes: set[str] = set()
    crash_at = 1
    while True:
        with ctx.uow(read_only=True) as uow:
            before = uow.profiles.get("ann")
        session = service.start_session("ann", "desk-a", fake, vm)
        guest_writes(session.path, crash_at, crash_at * MiB)
        clock.update(n=0, crash_at=crash_at)
        try:
            service.end_session(session.layer_id, fake, vm)
            finished = True
        except Killed:
            finished = False
        clock["crash_at"] = -1
        # The broker restarts: sessions whose disk no desktop holds are set aside; one
        # still attached is logged off again.
        restarted = ProfileService(ctx, tmp_path / "profiles")
        restarted.recover_sessions(attached_serials([fake]),
                                   started_before=datetime.now(UTC) + timedelta(seconds=5))
        with ctx.uow(read_only=True) as uow:
            still_open = uow.profiles.layer(session.layer_id).state is LayerState.SESSION
        if still_open:
            restarted.end_session(session.layer_id, fake, vm)
        with ctx.uow(read_only=True) as uow:
            after = uow.profiles.get("ann")
            layer = uow.profiles.layer(session.layer_id)
            top = uow.profiles.layer(after.layer_id) if after.layer_id else None
        if after.generation == before.generation:
            assert after.layer_id == before.layer_id and layer.state is LayerState.UNCLEAN
            outcomes.add("old")
        else:
            assert after.generation == before.generation + 1
            assert after.layer_id == session.layer_id and layer.state is LayerState.COMMITTED
            assert holds(session.path, crash_at, crash_at * MiB)
            outcomes.add("new")
        assert top is not None and top.sha256 == sha256_of(Path(top.path))
        assert check_is_clean(Path(top.path))
        if finished:
            break
        crash_at += 1
    assert outcomes == {"old", "new"} and crash_at > 10  # every step was cut at least once


def check_is_clean(path: Path) -> bool:
    return subprocess.run(["qemu-img", "check", "-q", str(path)]).returncode == 0


def test_reset_starts_a_fresh_home_and_keeps_the_old_one_for_a_rollback(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext) -> None:
    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm_a, vm_b = desktop(fake, "desk-a"), desktop(fake, "desk-b")
    session_cycle(service, fake, vm_a, "ann", 0x55, 4 * MiB)
    aside = service.start_session("ann", "desk-b", fake, vm_b)
    raced = service.start_session("ann", "desk-a", fake, vm_a)

    assert service.reset("ann", actor="admin").generation == 3
    assert not service.end_session(raced.layer_id, fake, vm_a).committed

    assert not holds(committed_path(service, "ann"), 0x55, 4 * MiB)
    view = service.describe("ann")
    assert (view.generation, view.rollback_to, view.open_sessions) == (3, (1, 2), ("desk-b",))
    assert [desk for desk, _ in view.unclean] == ["desk-a"]
    assert "generation 3 was committed meanwhile, and the profile was rolled back or reset" in (
        view.unclean[0][1])
    service.rollback("ann", 2, actor="admin")
    assert holds(committed_path(service, "ann"), 0x55, 4 * MiB)
    assert "profile-reset" in event_kinds(ctx, "ann")
    service.end_session(aside.layer_id, fake, vm_b)
    with pytest.raises(NotFound):
        service.describe("bob")


def test_brokers_racing_to_make_a_first_profile_make_one(service: ProfileService,
                                                         tmp_path: Path) -> None:
    import threading

    barrier = threading.Barrier(4)
    made: list[int] = []
    errors: list[BaseException] = []

    def make() -> None:
        barrier.wait()
        try:
            made.append(service.ensure_profile("ann", quota_bytes=QUOTA).generation)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and made == [1, 1, 1, 1]
    files = sorted((tmp_path / "profiles" / "ann").glob("*.qcow2"))
    assert files == [committed_path(service, "ann")]  # the losers removed their own


def test_a_recovery_during_logoff_wins_and_nothing_is_committed(
        service: ProfileService, fake: FakeDriver, ctx: ServiceContext,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another broker's recovery sets the layer aside while this one checks it. (A recovery
    between the commit transaction's read and its writes is fenced by the conditional
    ``session -> committed`` write in that transaction; not reproduced here.)"""
    from deskpool.images import profile_disks

    service.ensure_profile("ann", quota_bytes=QUOTA)
    vm = desktop(fake, "desk-a")
    session = service.start_session("ann", "desk-a", fake, vm)
    check = profile_disks.check_layer

    def check_while_another_broker_recovers(path: Path) -> profile_disks.LayerCheck:
        # The disk is detached now: another broker's recovery sees no desktop holding it.
        ProfileService(ctx, tmp_path / "profiles").recover_sessions(
            set(), started_before=datetime.now(UTC) + timedelta(seconds=5))
        return check(path)

    monkeypatch.setattr(profile_disks, "check_layer", check_while_another_broker_recovers)
    assert not service.end_session(session.layer_id, fake, vm).committed
    with ctx.uow(read_only=True) as uow:
        assert uow.profiles.get("ann").generation == 1
        assert uow.profiles.layer(session.layer_id).state is LayerState.UNCLEAN
