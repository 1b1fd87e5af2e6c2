"""Storage faults on the fake driver: the host's storage fills up in the middle of a clone, and
a template version's disk is corrupted in the template store (its checksum no longer matches).
Each gives the desktop being made a clear error, leaves no half-made desktop (no VM, no
volume), and leaves the desktops already running, and their users, alone."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deskpool.domain.errors import DriverError
from deskpool.domain.models import PowerState
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.base import owned_volume_names
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.fake_pool_world import Clock, fake_driver, fake_host_context
from tests.pool_users import PoolUsers


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    with fake_host_context(tmp_path, "fake://storage", golden=False) as context:
        yield context


def publish(ctx: ServiceContext, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A new version of template ``golden``: its disk in the template store, and the name of
    its copy on a host."""
    disk = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    version = TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    return Path(version.image_path), f"tv-{version.id}.qcow2"


@pytest.fixture()
def fake(ctx: ServiceContext) -> FakeDriver:
    return fake_driver("fake://storage")


@pytest.fixture()
def reconciler(ctx: ServiceContext) -> Reconciler:
    return Reconciler(ctx, workers=2, ready_timeout_s=5, clock=Clock())


def states(ctx: ServiceContext) -> dict[uuid.UUID, tuple[str, str | None]]:
    with ctx.uow(read_only=True) as uow:
        return {d.id: (d.state.value, d.last_error) for d in uow.desktops.summaries()
                for d in [uow.desktops.get(d.id)]}


def nothing_of(fake: FakeDriver, desktop_id: uuid.UUID) -> bool:
    """No VM and no volume of the desktop on the host: nothing half-made."""
    return (desktop_id not in {vm.vm_id for vm in fake.list_vms()}
            and not set(owned_volume_names(desktop_id)) & set(fake.list_volumes()))


def held_desktop(ctx: ServiceContext, reconciler: Reconciler, **spec: object) -> tuple[
        PoolUsers, uuid.UUID]:
    PoolService(ctx).create(PoolSpec(name="lab", template="golden",  # type: ignore[arg-type]
                                     naming_pattern="lab-{n:02}", **spec))
    users = PoolUsers(ctx, "lab")
    users.entitle("alice", "bob")
    reconciler.run_pass()
    mine = users.connect("alice")
    users.open_console(mine, "alice")
    return users, mine


def test_storage_full_in_the_middle_of_a_clone_leaves_no_half_made_desktop(
    ctx: ServiceContext, tmp_path: Path, fake: FakeDriver, reconciler: Reconciler
) -> None:
    publish(ctx, tmp_path, "v1")
    users, alices = held_desktop(ctx, reconciler, spare=1, max_size=3)
    # The root disk is made, then the host's storage is full when the VM is defined.
    fake.fail_next("create_vm.define", DriverError(
        "defining VM lab-02 on fake://storage: No space left on device"))
    report = reconciler.run_pass()  # the pool makes its spare again: lab-02
    assert any("No space left on device" in e for e in report.errors), report.errors
    (failed,) = [d for d, (state, _) in states(ctx).items() if state == "error"]
    assert states(ctx)[failed][1] == (
        "defining VM lab-02 on fake://storage: No space left on device")
    assert nothing_of(fake, failed)  # no VM, and the root disk made before is gone again
    # Alice's desktop is untouched by it.
    assert states(ctx)[alices] == ("in_use", None)
    assert fake.get_vm(alices).power_state is PowerState.RUNNING
    # Space again: the failed one is replaced and the pool is whole.
    reconciler.clock.now = datetime(2026, 12, 6, 12, 5, tzinfo=UTC)  # type: ignore[attr-defined]
    reconciler.run_pass()
    reconciler.run_pass()
    assert failed not in states(ctx) or states(ctx)[failed][0] == "retired"
    assert users.connect("bob") != alices


def test_a_corrupted_template_disk_is_refused_and_running_desktops_keep_serving(
    ctx: ServiceContext, tmp_path: Path, fake: FakeDriver, reconciler: Reconciler
) -> None:
    publish(ctx, tmp_path, "v1")
    users, alices = held_desktop(ctx, reconciler, spare=1, max_size=4, canary=1)
    reconciler.run_pass()  # a free v1 desktop besides alice's
    v2, v2_volume = publish(ctx, tmp_path, "v2")
    with v2.open("r+b") as disk:  # bit rot in the template store after publishing
        disk.seek(4096)
        disk.write(b"\xde\xad\xbe\xef")
    PoolService(ctx).rollout("lab")
    before = set(states(ctx))
    report = reconciler.run_pass()  # a canary of v2 is attempted
    assert any("checksum of" in e and "volume not imported" in e for e in report.errors), \
        report.errors
    # The canary that found it leaves nothing, its row included; the pool carries the fault
    # (see test_template_faults.py for the backoff).
    assert set(states(ctx)) == before
    assert not [vm for vm in fake.list_vms() if vm.vm_id not in before]
    fault = PoolService(ctx).get("lab").fault
    assert fault is not None and "checksum of" in fault and "version 2" in fault
    assert v2_volume not in fake.list_volumes()  # nothing of the bad image reached the host
    # The old version's desktops are untouched: alice's session goes on, and the free v1
    # desktop is not retired for a new version that cannot be made (no canary is ready), so
    # rolling back serves the next user at once.
    assert states(ctx)[alices] == ("in_use", None)
    assert fake.get_vm(alices).power_state is PowerState.RUNNING
    PoolService(ctx).rollback("lab")
    bobs = users.connect("bob")
    assert bobs in before and bobs != alices
