"""Stateless mode on the fake hypervisor: a guest that reboots or shuts down from inside never
boots again on what it wrote. Its VM is made so that a reboot ends it, and the reconciler
resets it as at a logoff (reverted to its factory snapshot, its session over, its user told);
other pool kinds, and a shutdown deskpool's own power policy asked for, are left alone."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.context import ServiceContext
from deskpool.services.events import messages_for, recent_events
from deskpool.store.leases import Leased
from tests.fake_pool_world import Clock
from tests.functional import test_vm_crash as crash_world
from tests.functional.test_vm_crash import desktop, make_pool

ctx, fake, clock, reconciler = (crash_world.ctx, crash_world.fake, crash_world.clock,
                                crash_world.reconciler)
SCRATCH = "/root/scratch.txt"


def defined_to_end_at_reboot(fake: FakeDriver, desktop_id: uuid.UUID) -> bool:
    spec = fake.defined_spec(desktop_id)
    assert spec is not None
    return spec.reboot_ends_vm


def write_scratch(fake: FakeDriver, desktop_id: uuid.UUID) -> None:
    GuestAgent(fake, desktop_id).write_file(SCRATCH, b"left behind\n")
    assert GuestAgent(fake, desktop_id).read_file(SCRATCH) == b"left behind\n"


def test_a_reboot_inside_a_held_stateless_desktop_reverts_it_and_ends_the_session(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    users = make_pool(ctx, "lab")
    reconciler.run_pass()
    desktop_id = users.connect("alice")
    users.open_console(desktop_id, "alice")
    assert defined_to_end_at_reboot(fake, desktop_id)
    write_scratch(fake, desktop_id)

    fake.reboot_guest(desktop_id)
    report = reconciler.run_pass()
    assert report.counts[Outcome.RESET] == 1
    assert report.counts[Outcome.CRASHED] == 0
    reconciler.run_pass()  # the revert step, if the first pass did not reach it
    row = desktop(ctx, desktop_id)
    assert (row.state, row.power_state, row.assigned_user) == ("ready", "running", None)
    with pytest.raises(Exception, match="scratch"):
        GuestAgent(fake, desktop_id).read_file(SCRATCH)
    (told,) = [m.message for m in messages_for(ctx, "alice") if m.kind == "desktop-restarted"]
    assert told.startswith(f"your desktop {row.name} was shut down or restarted from inside")
    assert any(e.kind == "desktop-reset" and e.desktop == row.name for e in recent_events(ctx))
    assert users.connect("alice") in {d.id for d in crash_world.live(ctx, "lab")}


def test_a_free_stateless_desktop_shut_down_inside_is_reverted_and_runs_again(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    make_pool(ctx, "lab")
    reconciler.run_pass()
    (free,) = crash_world.live(ctx, "lab")
    write_scratch(fake, free.id)
    fake.reboot_guest(free.id)
    assert reconciler.run_pass().counts[Outcome.RESET] == 1
    reconciler.run_pass()
    assert desktop(ctx, free.id).state == "ready"
    with pytest.raises(Exception, match="scratch"):
        GuestAgent(fake, free.id).read_file(SCRATCH)
    # No user held it: nobody is told, the admin's log says why it was reverted.
    assert not [e for e in recent_events(ctx) if e.kind == "desktop-restarted"]


@pytest.mark.parametrize("kind,on_logout,assignment", [
    (PoolKind.STATEFUL, OnLogout.RECYCLE_AS_IS, Assignment.DEDICATED),
    (PoolKind.STATELESS, OnLogout.RECYCLE_AS_IS, Assignment.FLOATING),  # a kiosk's choice
])
def test_a_reboot_in_other_pool_kinds_keeps_the_disk_and_the_session(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, kind: PoolKind,
    on_logout: OnLogout, assignment: Assignment
) -> None:
    users = make_pool(ctx, "keep", kind=kind, on_logout=on_logout, assignment=assignment)
    reconciler.run_pass()
    desktop_id = users.connect("bob")
    assert not defined_to_end_at_reboot(fake, desktop_id)
    write_scratch(fake, desktop_id)
    fake.reboot_guest(desktop_id)  # the same VM boots again
    report = reconciler.run_pass()
    assert report.counts[Outcome.RESET] == 0
    row = desktop(ctx, desktop_id)
    assert (row.state, row.assigned_user) == ("reserved", "bob")
    assert GuestAgent(fake, desktop_id).read_file(SCRATCH) == b"left behind\n"


def test_a_shutdown_under_a_brokers_lease_is_not_taken_for_a_reboot(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    make_pool(ctx, "lab")
    reconciler.run_pass()
    (free,) = crash_world.live(ctx, "lab")
    with ctx.uow() as uow:  # another broker's power-policy step is shutting it down
        assert uow.leases.take(Leased.DESKTOP, free.id, "other-broker",
                               clock.now + timedelta(minutes=5), clock.now)
        uow.commit()
    fake.reboot_guest(free.id)
    assert reconciler.run_pass().counts[Outcome.RESET] == 0
    row = desktop(ctx, free.id)
    assert (row.state, row.power_state) == ("ready", "shutoff")


def test_a_reset_stateless_desktop_gets_its_machine_secrets_back(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    """Its SSH host key (its name's, the same after the reset) and a keytab given for its
    name meanwhile are in place again once the reset desktop runs, through the agent."""
    from deskpool.services.machine_secrets import MachineSecrets, public_host_key

    make_pool(ctx, "lab")
    reconciler.run_pass()
    (free,) = crash_world.live(ctx, "lab")
    agent = GuestAgent(fake, free.id)
    with ctx.uow(read_only=True) as uow:
        hostname = uow.desktops.get(free.id).hostname
    key = agent.read_file("/etc/ssh/ssh_host_ed25519_key.pub")
    assert key == public_host_key(ctx, free.name, hostname)
    assert agent.read_file("/etc/ssh/ssh_host_ed25519_key").startswith(
        b"-----BEGIN OPENSSH PRIVATE KEY-----")
    MachineSecrets(ctx).set_credential(free.name, "/etc/krb5.keytab", b"keytab bytes")
    write_scratch(fake, free.id)
    fake.reboot_guest(free.id)
    assert reconciler.run_pass().counts[Outcome.RESET] == 1
    reconciler.run_pass()
    assert desktop(ctx, free.id).state == "ready"
    assert agent.read_file("/etc/ssh/ssh_host_ed25519_key.pub") == key
    assert agent.read_file("/etc/krb5.keytab") == b"keytab bytes"
    with pytest.raises(Exception, match="machine-secrets"):
        agent.read_file("/run/deskpool/machine-secrets/0")  # nothing staged left behind


def test_a_pool_that_reverts_by_boot_gives_a_fresh_overlay_and_keeps_no_snapshot(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    """``revert_by=boot``: no factory snapshot; at a logoff and at a reboot from inside, the
    desktop's VM is made anew on the master (its writes gone), booted, its identity and
    machine secrets given again, and it is ready for the next user."""
    from deskpool.broker.sessions import SessionService
    from deskpool.domain.pools import RevertBy
    from deskpool.services.pool_admin import PoolAdmin

    users = make_pool(ctx, "lab")
    PoolAdmin(ctx).update("lab", {"revert_by": RevertBy.BOOT})
    reconciler.run_pass()
    desktop_id = users.connect("alice")
    row = desktop(ctx, desktop_id)
    assert fake.list_snapshots(desktop_id) == []  # made without one
    write_scratch(fake, desktop_id)
    SessionService(ctx).log_off(desktop_id, by=None, reason="test")
    for _ in range(3):
        reconciler.run_pass()
    after = desktop(ctx, desktop_id)
    assert (after.state, after.power_state, after.assigned_user) == ("ready", "running", None)
    assert after.name == row.name
    with pytest.raises(Exception, match="scratch"):
        GuestAgent(fake, desktop_id).read_file(SCRATCH)
    assert GuestAgent(fake, desktop_id).read_file("/etc/ssh/ssh_host_ed25519_key.pub")
    # A reboot from inside does the same (no snapshot to go back to, no retirement).
    write_scratch(fake, desktop_id)
    fake.reboot_guest(desktop_id)
    assert reconciler.run_pass().counts[Outcome.RESET] == 1
    reconciler.run_pass()
    assert desktop(ctx, desktop_id).state == "ready"
    with pytest.raises(Exception, match="scratch"):
        GuestAgent(fake, desktop_id).read_file(SCRATCH)
    assert desktop_id in {d.id for d in crash_world.live(ctx, "lab")}
