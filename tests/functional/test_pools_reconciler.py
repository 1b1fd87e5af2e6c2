"""Pools and the reconciler on the fake driver: sizing, recycle, retire, rollout, power policy,
hypervisor drift and recovery from interrupted work."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deskpool.broker.handover import Handover
from deskpool.domain.errors import AgentUnavailable, InvalidInput, NotFound, Unavailable
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, PowerState, VmMetadata, VmSpec
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec, PowerPolicy
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from tests.fake_pool_world import Clock, fake_driver, fake_host_context
from tests.pool_users import PoolUsers


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    with fake_host_context(tmp_path, "fake://pools") as context:
        yield context


@pytest.fixture()
def fake(ctx: ServiceContext) -> FakeDriver:
    return fake_driver("fake://pools")


@pytest.fixture()
def clock() -> Clock:
    return Clock(datetime(2026, 11, 23, 12, 0, tzinfo=UTC))


@pytest.fixture()
def reconciler(ctx: ServiceContext, clock: Clock) -> Reconciler:
    return Reconciler(ctx, workers=4, ready_timeout_s=5, clock=clock)


def make_pool(ctx: ServiceContext, **kw: object) -> str:
    fields: dict[str, object] = {"name": "lab", "template": "golden", "spare": 2,
                                 "max_size": 5, "naming_pattern": "lab-{n:02}"}
    fields.update(kw)
    PoolService(ctx).create(PoolSpec(**fields))  # type: ignore[arg-type]
    return str(fields["name"])


def desktops(ctx: ServiceContext, state: str | None = None) -> list[DesktopView]:
    return [d for d in DesktopService(ctx).list() if state is None or d.state == state]


def test_pool_fills_to_spare_by_itself(ctx: ServiceContext, reconciler: Reconciler) -> None:
    make_pool(ctx)
    report = reconciler.run_pass()
    assert report.created == 2 and report.errors == []
    ready = desktops(ctx, "ready")
    assert sorted(d.name for d in ready) == ["lab-01", "lab-02"]
    assert reconciler.run_pass().created == 0  # stable once at size


def test_recycle_reverts_to_the_factory_snapshot(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1))
    users.entitle("alice", "bob")
    reconciler.run_pass()
    desktop_id = users.connect("alice")
    users.open_console(desktop_id, "alice")
    agent = GuestAgent(fake, desktop_id)
    agent.write_file("/home/user/secret.txt", b"alice was here")
    assert agent.read_file("/home/user/secret.txt") == b"alice was here"
    assert users.log_off(desktop_id, "alice") == "recycling"
    reconciler.run_pass()
    assert DesktopService(ctx).get(str(desktop_id)).state == "ready"
    with pytest.raises(Exception, match=r"secret\.txt"):
        agent.read_file("/home/user/secret.txt")
    assert users.connect("bob") == desktop_id  # clean again, handed to the next user


def test_recycle_as_is_keeps_the_guest_state(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1, on_logout=OnLogout.RECYCLE_AS_IS))
    users.entitle("kiosk")
    reconciler.run_pass()
    desktop_id = users.connect("kiosk")
    GuestAgent(fake, desktop_id).write_file("/tmp/kept", b"1")
    users.log_off(desktop_id, "kiosk")
    reconciler.run_pass()
    assert GuestAgent(fake, desktop_id).read_file("/tmp/kept") == b"1"


def test_one_time_desktops_retire_after_first_use(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1, one_time=True))
    users.entitle("alice")
    reconciler.run_pass()
    first = users.connect("alice")
    assert users.log_off(first, "alice") == "retiring"
    reconciler.run_pass()  # retires it and, at the same time, makes its replacement
    reconciler.run_pass()
    assert first not in {d.id for d in desktops(ctx)}
    assert first not in {vm.vm_id for vm in fake.list_vms()}
    assert len(desktops(ctx, "ready")) == 1


def test_rollout_replaces_free_desktops_now_and_held_ones_as_users_leave(
    ctx: ServiceContext, reconciler: Reconciler, tmp_path: Path
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=2))
    users.entitle("alice")
    reconciler.run_pass()
    pools = PoolService(ctx)
    held = users.connect("alice")
    disk = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    assert pools.rollout("lab").version == 2
    reconciler.run_pass()  # free v1 desktop retired, v2 desktops made
    reconciler.run_pass()
    versions = {d.id: d.version for d in desktops(ctx)}
    assert versions[held] == 1  # alice keeps hers while she works
    assert sorted(v for k, v in versions.items() if k != held) == [2, 2]
    users.log_off(held, "alice")
    reconciler.run_pass()
    reconciler.run_pass()
    assert {d.version for d in desktops(ctx)} == {2}
    assert pools.rollback("lab").version == 1
    reconciler.run_pass()
    reconciler.run_pass()
    assert {d.version for d in desktops(ctx, "ready")} == {1}


def test_unknown_deskpool_vm_is_removed_and_foreign_vm_left_alone(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    """Orphans of this deployment (and of versions that did not name deployments) go; VMs
    of another deskpool deployment sharing the host, and VMs deskpool did not make, stay."""
    fake.import_volume("orphan-base", Path(next(iter(
        TemplateService(ctx).list_versions())).image_path))

    def deskpool_vm(name: str, installation: uuid.UUID | None) -> uuid.UUID:
        vm_id = uuid.uuid4()
        fake.create_vm(VmSpec(vm_id=vm_id, name=name, base_volume="orphan-base",
                              clone_mode=CloneMode.LINKED, mac=new_mac(),
                              metadata=VmMetadata(vm_id, name, None, installation)))
        return vm_id

    orphan = deskpool_vm("ghost", ctx.installation_id)
    older_orphan = deskpool_vm("older-ghost", None)
    other_deployments = deskpool_vm("staging-001", uuid.uuid4())
    foreign = fake.add_foreign_vm("someone-elses")
    report = reconciler.run_pass()
    vm_ids = {vm.vm_id for vm in fake.list_vms()}
    assert report.orphans_removed == 2
    assert orphan not in vm_ids and older_orphan not in vm_ids
    assert {foreign, other_deployments} <= vm_ids


def test_vanished_vm_is_marked_then_replaced_after_backoff(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    make_pool(ctx, spare=1)
    reconciler.run_pass()
    (victim,) = desktops(ctx, "ready")
    fake.remove_vm_behind_our_back(victim.id)
    report = reconciler.run_pass()
    assert report.vanished == 1
    stuck = DesktopService(ctx).get(str(victim.id))
    assert stuck.state == "error" and stuck.last_error and "vanished" in stuck.last_error
    reconciler.run_pass()  # still backing off: the failed desktop is left alone for now
    assert DesktopService(ctx).get(str(victim.id)).state == "error"
    clock.now += timedelta(minutes=1)
    reconciler.run_pass()
    reconciler.run_pass()
    assert victim.id not in {d.id for d in desktops(ctx)}
    assert len(desktops(ctx, "ready")) == 1


def test_power_state_follows_the_hypervisor_and_policy_applies(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    make_pool(ctx, spare=1, power_policy=PowerPolicy.SUSPEND)
    reconciler.run_pass()  # made and ready, running
    reconciler.run_pass()  # power policy: suspended
    (desktop,) = desktops(ctx, "ready")
    assert fake.get_vm(desktop.id).power_state is PowerState.SAVED
    reconciler.run_pass()  # the database learns it from the hypervisor
    assert DesktopService(ctx).get(desktop.name).power_state == "saved"


@pytest.mark.parametrize("max_size", [1, 2])
def test_a_spare_being_suspended_is_not_handed_to_a_user_meanwhile(
    ctx: ServiceContext, fake: FakeDriver, max_size: int
) -> None:
    """The power policy suspends a free desktop while a user connects: the user must not get
    it (it would be suspended under them). They are told to come back in a moment instead,
    with a desktop made for them where the pool may grow, and never that the pool is full."""
    users = PoolUsers(ctx, make_pool(ctx, spare=1, max_size=max_size,
                                     power_policy=PowerPolicy.SUSPEND))
    users.entitle("alice")
    reconciler = Reconciler(ctx, workers=1, ready_timeout_s=5)  # the broker's own clock
    reconciler.run_pass()  # the spare is made and ready, still running
    (spare,) = desktops(ctx, "ready")
    suspend = fake.suspend_vm
    answers: list[Handover] = []

    def suspend_while_alice_connects(vm_id: uuid.UUID) -> None:
        answers.append(users.try_connect("alice"))
        suspend(vm_id)

    fake.suspend_vm = suspend_while_alice_connects  # type: ignore[method-assign]
    report = reconciler.run_pass()
    assert report.power_changes == 1 and report.errors == []
    assert answers[0].status == "pending" and answers[0].desktop_id is None, answers[0]
    assert "moment" in answers[0].message or "being made for you" in answers[0].message
    with ctx.uow(read_only=True) as uow:
        row = uow.desktops.get(spare.id)
        assert (row.state, row.assigned_user) == ("ready", None)
    assert fake.get_vm(spare.id).power_state is PowerState.SAVED
    fake.suspend_vm = suspend  # type: ignore[method-assign]
    # Once the suspend is done the desktop is free again: resumed and handed over.
    if max_size == 1:
        assert users.connect("alice") == spare.id
        assert fake.get_vm(spare.id).power_state is PowerState.RUNNING


def test_a_spare_being_shut_off_is_not_handed_to_a_user_while_it_powers_off(
    ctx: ServiceContext, fake: FakeDriver
) -> None:
    """The power policy shuts a free desktop off. The guest's ACPI shutdown takes time (the
    fake's VM still reads running once after the request), so a step that gave its lease back
    right after asking would let a user's claim take a desktop that is powering off. A user
    connecting during the step is told to come back in a moment; one connecting as soon as
    the pass is over finds the desktop off, and it is started for them."""
    users = PoolUsers(ctx, make_pool(ctx, spare=1, max_size=1,
                                     power_policy=PowerPolicy.SHUTOFF))
    users.entitle("alice")
    reconciler = Reconciler(ctx, workers=1, ready_timeout_s=5)  # the broker's own clock
    reconciler.run_pass()  # the spare is made and ready, still running
    (spare,) = desktops(ctx, "ready")
    stop = fake.stop_vm
    answers: list[Handover] = []

    def stop_while_alice_connects(vm_id: uuid.UUID, *, force: bool = False) -> None:
        stop(vm_id, force=force)
        if not answers:
            answers.append(users.try_connect("alice"))

    fake.stop_vm = stop_while_alice_connects  # type: ignore[method-assign]
    report = reconciler.run_pass()
    fake.stop_vm = stop  # type: ignore[method-assign]
    assert report.power_changes == 1 and report.errors == []
    assert answers[0].status == "pending" and answers[0].desktop_id is None, answers[0]
    # The pass is over and the lease given back: the next claim must not find it going down.
    after = users.try_connect("alice")
    assert (after.status, after.desktop_id) == ("ready", spare.id), after
    assert fake.get_vm(spare.id).power_state is PowerState.RUNNING
    assert GuestAgent(fake, spare.id).ping()
    with ctx.uow(read_only=True) as uow:
        row = uow.desktops.get(spare.id)
        assert (row.state, row.assigned_user) == ("reserved", "alice")


def test_a_spare_whose_guest_ignores_the_shutdown_is_forced_off_after_a_grace(
    ctx: ServiceContext, fake: FakeDriver
) -> None:
    """A guest that does not act on the ACPI request (hung, or no ACPI handling) would keep
    the step waiting for ever: after the grace period the free desktop is forced off."""
    make_pool(ctx, spare=1, max_size=1, power_policy=PowerPolicy.SHUTOFF)
    reconciler = Reconciler(ctx, workers=1, ready_timeout_s=5)
    reconciler.run_pass()
    (spare,) = desktops(ctx, "ready")
    stop = fake.stop_vm
    forced: list[bool] = []

    def deaf_guest(vm_id: uuid.UUID, *, force: bool = False) -> None:
        forced.append(force)
        if force:
            stop(vm_id, force=True)

    fake.stop_vm = deaf_guest  # type: ignore[method-assign]
    reconciler.steps.shutdown_grace_s = 0.2
    report = reconciler.run_pass()
    fake.stop_vm = stop  # type: ignore[method-assign]
    assert report.power_changes == 1 and report.errors == []
    assert forced == [False, True]
    assert fake.get_vm(spare.id).power_state is PowerState.SHUTOFF
    view = DesktopService(ctx).get(str(spare.id))
    assert (view.state, view.power_state) == ("ready", "shutoff")


def test_interrupted_provisioning_is_finished_from_the_row(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    make_pool(ctx, spare=1, max_size=1)
    fake.fail_next("start_vm")  # the process "dies" right after defining the VM
    reconciler.run_pass()
    clock_free = Reconciler(ctx, ready_timeout_s=5,
                            clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    clock_free.run_pass()
    clock_free.run_pass()
    ready = desktops(ctx, "ready")
    assert len(ready) == 1 and len(fake.list_vms()) == 1


def test_failure_is_recorded_with_reason_and_retry_count(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    make_pool(ctx, spare=1)
    fake.fail_next("create_vm.define")
    report = reconciler.run_pass()
    assert report.errors and "injected" in report.errors[0]
    (failed,) = desktops(ctx)
    assert failed.state == "error" and failed.last_error and "injected" in failed.last_error


def test_bad_pools_are_refused_and_nothing_is_stored(ctx: ServiceContext) -> None:
    pools = PoolService(ctx)
    with pytest.raises(InvalidInput, match="below min"):
        pools.create(PoolSpec("p", "golden", min_size=3, max_size=2, spare=0))
    with pytest.raises(InvalidInput, match="above max"):
        pools.create(PoolSpec("p", "golden", max_size=2, spare=3))
    with pytest.raises(InvalidInput, match="no saved memory state"):
        pools.create(PoolSpec("p", "golden", clone_mode="instant"))
    with pytest.raises(InvalidInput, match="stateful"):
        pools.create(PoolSpec("p", "golden", kind=PoolKind.STATEFUL))
    with pytest.raises(NotFound, match="nosuch"):
        pools.create(PoolSpec("p", "nosuch"))
    assert pools.list() == []


def test_dedicated_desktop_stays_with_its_user_across_sessions(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    users = PoolUsers(ctx, make_pool(
        ctx, spare=1, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
        on_logout=OnLogout.RECYCLE_AS_IS))
    users.entitle("alice", "bob")
    reconciler.run_pass()
    mine = users.connect("alice")
    users.open_console(mine, "alice")
    GuestAgent(fake, mine).write_file("/home/alice/notes.txt", b"keep me")
    users.log_off(mine, "alice")
    reconciler.run_pass()  # back to ready, still alice's; a new spare is made for others
    reconciler.run_pass()
    other = users.connect("bob")
    assert other != mine
    assert users.connect("alice") == mine
    assert GuestAgent(fake, mine).read_file("/home/alice/notes.txt") == b"keep me"


# --- a user's state is never destroyed by a rollout -----------------------------------------
# A stateful pool's dedicated desktop keeps its user's changes through every way a pool moves
# between template versions; the user logs off while the desktop is outdated (the moment a
# stateless desktop is replaced) and afterwards finds the same desktop with their file on it.

NOTES = "/home/alice/notes.txt"


def publish_v2(ctx: ServiceContext, tmp_path: Path) -> None:
    disk = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))


def run_passes(reconciler: Reconciler, n: int = 3) -> None:
    for _ in range(n):
        reconciler.run_pass()


def alice_works(users: PoolUsers, fake: FakeDriver) -> uuid.UUID:
    mine = users.connect("alice")
    users.open_console(mine, "alice")
    GuestAgent(fake, mine).write_file(NOTES, b"my thesis, chapter 3")
    return mine


@pytest.mark.parametrize("path", ["rollout", "canary", "rollback", "max-age"])
def test_a_stateful_users_desktop_survives_every_version_change(
    path: str, ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock,
    tmp_path: Path,
) -> None:
    pools = PoolService(ctx)
    users = PoolUsers(ctx, make_pool(
        ctx, spare=1, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
        on_logout=OnLogout.RECYCLE_AS_IS, canary=1 if path == "canary" else 0,
        max_age_s=3600 if path == "max-age" else None))
    users.entitle("alice", "bob")
    run_passes(reconciler, 1)
    if path == "rollback":
        publish_v2(ctx, tmp_path)
        pools.rollout("lab")
        run_passes(reconciler)
    mine = alice_works(users, fake)
    mine_version = {d.id: d.version for d in desktops(ctx)}[mine]

    if path in ("rollout", "canary"):
        publish_v2(ctx, tmp_path)
        assert pools.rollout("lab").version == 2
    elif path == "rollback":
        assert pools.rollback("lab").version == 1
    else:
        clock.now += timedelta(hours=2)
    run_passes(reconciler)
    # Logging off an outdated (or aged) desktop: a stateless one would be retired here.
    assert users.log_off(mine, "alice") == "recycling"
    run_passes(reconciler)
    clock.now += timedelta(hours=2)
    run_passes(reconciler)

    after = {d.id: d for d in desktops(ctx)}
    assert mine in after, f"alice's desktop was destroyed by the {path}"
    assert after[mine].state == "ready" and after[mine].version == mine_version
    assert users.connect("alice") == mine
    assert GuestAgent(fake, mine).read_file(NOTES) == b"my thesis, chapter 3"
    # The rest of the pool did move on: bob gets a desktop of the pool's current version.
    current = pools.get("lab").version
    bobs = users.connect("bob")
    assert {d.id: d.version for d in desktops(ctx)}[bobs] == current


def test_a_stateless_outdated_desktop_is_still_replaced_at_logout(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, tmp_path: Path,
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1))
    users.entitle("alice")
    run_passes(reconciler, 1)
    mine = alice_works(users, fake)
    publish_v2(ctx, tmp_path)
    PoolService(ctx).rollout("lab")
    assert users.log_off(mine, "alice") == "retiring"
    run_passes(reconciler)
    assert mine not in {d.id for d in desktops(ctx)}


def test_a_stateful_desktop_failing_at_hand_over_is_repaired_never_replaced(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock,
) -> None:
    users = PoolUsers(ctx, make_pool(
        ctx, spare=1, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
        on_logout=OnLogout.RECYCLE_AS_IS))
    users.entitle("alice")
    run_passes(reconciler, 1)
    mine = alice_works(users, fake)
    users.log_off(mine, "alice")
    run_passes(reconciler)
    # Her guest agent does not answer at her next logon (the broker waits no longer).
    impatient = PoolUsers(ctx, "lab", ready_timeout_s=0)
    fake.fail_next("agent_command", AgentUnavailable("agent silent"))
    with pytest.raises(Unavailable):
        impatient.try_connect("alice")
    failed = {d.id: d for d in desktops(ctx)}[mine]
    assert failed.state == "error"
    with pytest.raises(Unavailable, match=f"{failed.name} failed and is being repaired"):
        users.try_connect("alice")  # not a second desktop in its place
    for _ in range(3):  # the backoff runs out, the reconciler repairs it
        clock.now += timedelta(minutes=1)
        run_passes(reconciler, 1)
    assert users.connect("alice") == mine
    assert GuestAgent(fake, mine).read_file(NOTES) == b"my thesis, chapter 3"
    with ctx.uow(read_only=True) as uow:
        assert [d.id for d in uow.desktops.summaries() if d.assigned_user == "alice"] == [mine]


def test_a_revert_pool_desktop_without_a_factory_snapshot_is_replaced_not_reused(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver,
) -> None:
    users = PoolUsers(ctx, make_pool(ctx, spare=1))
    users.entitle("alice")
    run_passes(reconciler, 1)
    mine = alice_works(users, fake)
    with ctx.uow() as uow:  # made before its pool reverted: no snapshot to go back to
        uow.desktops.get(mine).has_factory_snapshot = False
        uow.commit()
    assert users.log_off(mine, "alice") == "retiring"  # alice's file goes with it
