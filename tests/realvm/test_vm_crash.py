"""A real crash of one VM: the QEMU process of a console-flavor desktop held by a user is
killed with SIGKILL. The reconciler marks the desktop failed with the reason libvirt gives
("shut off (crashed)"), its user is told; a stateless pool's desktop is replaced, a stateful
pool's keeps its disk, is started again and given back to its user with their file.
Then stateless mode: the stateless pool's desktop is rebooted from inside its guest, and it
comes back without what was written, with the database's identity and its machine secrets
(its name's SSH host key, a keytab given meanwhile), the template's disk unchanged.

Two small pools of one desktop each share one fixture, so the module boots four VMs in all:
one per pool, the stateless pool's replacement, and the stateful desktop's restart; the
reboot test then reverts the replacement to its factory snapshot."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import DeskpoolError, Unavailable
from deskpool.domain.models import PowerState, StopReason
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import messages_for, recent_events
from deskpool.services.factory import version_volume_names
from deskpool.services.machine_secrets import MachineSecrets, public_host_key
from deskpool.services.pools import PoolService
from deskpool.store.models import Desktop
from tests.conftest import kill_qemu_of
from tests.pool_users import PoolUsers
from tests.realvm.conftest import TEMPLATE

pytestmark = pytest.mark.realvm
READY_TIMEOUT_S = 240
STATELESS, STATEFUL = "fault-sl", "fault-sf"
CRASH = "its VM stopped unexpectedly: QEMU ended (crashed)"


def rows(ctx: ServiceContext, pool: str) -> list[Desktop]:
    with ctx.uow(read_only=True) as uow:
        (pool_id,) = [p.id for p in uow.pools.list() if p.name == pool]
        found = [uow.desktops.get(d.id) for d in uow.desktops.summaries(pool_id=pool_id)]
        for d in found:
            uow.detach(d)
        return found


def row(ctx: ServiceContext, desktop_id: uuid.UUID) -> Desktop:
    with ctx.uow(read_only=True) as uow:
        d = uow.desktops.get(desktop_id)
        uow.detach(d)
        return d


def ready(ctx: ServiceContext, pool: str) -> list[Desktop]:
    return [d for d in rows(ctx, pool) if d.state == "ready"]


def reconcile_until(reconciler: Reconciler, done: Callable[[], bool],
                    timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the pools did not settle in time"
        report = reconciler.run_pass()
        assert not report.errors, report.errors
        time.sleep(1)


@pytest.fixture(scope="module")
def crash_pools(real_ctx: ServiceContext) -> Iterator[Reconciler]:
    service = PoolService(real_ctx)
    service.create(PoolSpec(STATELESS, TEMPLATE, spare=1, max_size=1,
                            naming_pattern=f"{STATELESS}-{{n:02}}"))
    service.create(PoolSpec(STATEFUL, TEMPLATE, kind=PoolKind.STATEFUL,
                            assignment=Assignment.DEDICATED, on_logout=OnLogout.RECYCLE_AS_IS,
                            spare=1, max_size=1, naming_pattern=f"{STATEFUL}-{{n:02}}"))
    for pool in (STATELESS, STATEFUL):
        PoolUsers(real_ctx, pool).entitle("alice", "bob")
    reconciler = Reconciler(real_ctx, workers=3, ready_timeout_s=READY_TIMEOUT_S)
    yield reconciler
    for pool in (STATELESS, STATEFUL):
        service.resize(pool, min_size=0, spare=0)
        for desktop in rows(real_ctx, pool):
            if desktop.state not in ("retired",):
                DesktopService(real_ctx).delete(str(desktop.id))
    reconciler.run_pass()  # the deletions: VMs and disks go


def test_killed_qemu_marks_the_desktop_replaces_stateless_and_keeps_stateful(
    real_ctx: ServiceContext, crash_pools: Reconciler
) -> None:
    reconciler = crash_pools
    reconcile_until(reconciler, lambda: all(ready(real_ctx, p) for p in (STATELESS, STATEFUL)))
    driver = real_ctx.driver_for_name("local")
    alice = PoolUsers(real_ctx, STATELESS, ready_timeout_s=READY_TIMEOUT_S)
    bob = PoolUsers(real_ctx, STATEFUL, ready_timeout_s=READY_TIMEOUT_S)
    lost = alice.connect("alice")
    alice.open_console(lost, "alice")
    kept = bob.connect("bob")
    bob.open_console(kept, "bob")
    code, _, err = GuestAgent(driver, kept).exec_capture(
        ["sh", "-c", "echo bob-was-here > /root/bob.txt && sync"])
    assert code == 0, err

    for desktop_id in (lost, kept):  # a real crash of each VM, nothing else touched
        kill_qemu_of(driver.get_vm(desktop_id).name)
    SessionService(real_ctx).run_timers()  # the broker's timers first: they must do no harm
    assert {row(real_ctx, d).state for d in (lost, kept)} == {"in_use"}

    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 2
    for desktop_id in (lost, kept):
        failed = row(real_ctx, desktop_id)
        assert (failed.state, failed.last_error) == ("error", CRASH)
    assert row(real_ctx, lost).assigned_user is None
    assert row(real_ctx, kept).assigned_user == "bob"
    told = {e.user: e.message for e in recent_events(real_ctx) if e.kind == "desktop-lost"}
    assert CRASH in told["alice"] and "gives you a new desktop" in told["alice"]
    assert CRASH in told["bob"] and "your files are kept" in told["bob"]
    with pytest.raises(Unavailable, match="being repaired, with your files kept"):
        bob.try_connect("bob")
    assert root_volume_name(kept) in driver.list_volumes()

    # The stateless desktop is replaced, the stateful one started again: both boot at once.
    reconcile_until(reconciler, lambda: bool(ready(real_ctx, STATELESS))
                    and row(real_ctx, kept).state == "ready")
    assert lost not in {vm.vm_id for vm in driver.list_vms()}
    assert root_volume_name(lost) not in driver.list_volumes()
    assert [d.id for d in ready(real_ctx, STATELESS)] != [lost]
    assert alice.connect("alice") != lost
    assert [d.id for d in rows(real_ctx, STATEFUL)] == [kept]  # no second one beside it
    assert bob.connect("bob") == kept  # the same desktop, back to its user
    assert GuestAgent(driver, kept).read_file("/root/bob.txt") == b"bob-was-here\n"


KEYTAB = b"\x05\x02 a keytab's bytes, as a domain join writes them \x00\xff"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_reboot_inside_a_stateless_desktop_throws_its_writes_away(
    real_ctx: ServiceContext, crash_pools: Reconciler
) -> None:
    reconciler = crash_pools
    reconcile_until(reconciler, lambda: any(d.state in ("ready", "reserved", "in_use")
                                            for d in rows(real_ctx, STATELESS)))
    driver = real_ctx.driver_for_name("local")
    alice = PoolUsers(real_ctx, STATELESS, ready_timeout_s=READY_TIMEOUT_S)
    desktop_id = alice.connect("alice")  # the one she holds after the crash test, if it ran
    with real_ctx.uow(read_only=True) as uow:
        d = uow.desktops.get(desktop_id)
        name, hostname, machine_id = d.name, d.hostname, d.machine_id
        master = driver.volume_info(version_volume_names(d.template_version)[0]).path
        master_sha256 = d.template_version.image_sha256
    agent = GuestAgent(driver, desktop_id)
    # Its machine secrets: a keytab given for its name now reaches it at its next boot; its
    # SSH host key is the one its name always gets.
    MachineSecrets(real_ctx).set_credential(name, "/etc/krb5.keytab", KEYTAB)
    host_key = agent.read_file("/etc/ssh/ssh_host_ed25519_key.pub")
    assert host_key == public_host_key(real_ctx, name, hostname)
    code, _, err = agent.exec_capture(["sh", "-c", "rm /etc/ssh/ssh_host_ed25519_key.pub && "
                                       "echo left-behind > /root/scratch.txt && "
                                       "hostname wrong-name && echo wrong-name > /etc/hostname"
                                       " && echo 0123456789abcdef0123456789abcdef > "
                                       "/etc/machine-id && sync"])
    assert code == 0, err

    # A reboot from inside: the guest's own systemctl (not the hypervisor's reset).
    driver.agent_command(desktop_id, "guest-exec",
                         {"path": "/bin/systemctl", "arg": ["reboot"]})
    deadline = time.monotonic() + 300
    while (vm := driver.get_vm(desktop_id)).power_state is not PowerState.SHUTOFF:
        assert time.monotonic() < deadline, "the rebooted guest's VM never ended"
        time.sleep(2)
    assert vm.stop_reason is StopReason.SHUTDOWN  # no crash: QEMU ran with -no-reboot

    reconcile_until(reconciler, lambda: row(real_ctx, desktop_id).state == "ready")
    after = row(real_ctx, desktop_id)
    assert (after.name, after.assigned_user, after.power_state) == (name, None, "running")
    code, out, _ = agent.exec_capture(["sh", "-c", "cat /etc/machine-id; "
                                       "test -e /root/scratch.txt && echo scratch-kept || true"])
    assert code == 0
    assert out.split() == [machine_id]  # the database's; the scratch file is gone
    assert agent.host_name() == hostname
    assert sha256_of(master) == master_sha256  # the shared master was never written
    assert agent.read_file("/etc/ssh/ssh_host_ed25519_key.pub") == host_key
    assert agent.read_file("/etc/krb5.keytab") == KEYTAB
    code, out, _ = agent.exec_capture(["stat", "-c", "%a %U", "/etc/krb5.keytab",
                                       "/etc/ssh/ssh_host_ed25519_key"])
    assert (code, out.split()) == (0, ["600", "root", "600", "root"])
    told = [m.message for m in messages_for(real_ctx, "alice") if m.kind == "desktop-restarted"]
    assert told and told[0].startswith(f"your desktop {name} was shut down or restarted")
    with pytest.raises(DeskpoolError):
        agent.read_file("/root/scratch.txt")
