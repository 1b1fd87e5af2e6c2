"""Storage full during a clone, on qemu:///system: the host's storage is a tiny tmpfs that holds
the template's disk and a linked clone, but not a full copy. The full clone fails with a clear
error naming the lack of space, leaves no VM and no volume of it, and the desktop already
running on that storage keeps running. (No OS boots: an empty disk is enough to run.)"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.errors import DeskpoolError
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, PowerState, VmMetadata, VmSpec
from deskpool.drivers.base import HypervisorDriver, owned_volume_names
from tests.conftest import (
    DRIVER_TEST_INSTALLATION,
    qemu_system_unreachable_reason,
    skip_or_fail_without_real_vms,
)

pytestmark = pytest.mark.realvm
DATA_MIB = 6  # written into the template's disk, so a full copy needs as much again


@pytest.fixture()
def tiny_storage(tmp_path: Path) -> Iterator[Path]:
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "fault-storage", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture()
def driver(tiny_storage: Path) -> Iterator[HypervisorDriver]:
    from deskpool.drivers.libvirt import LibvirtDriver

    drv = LibvirtDriver("qemu:///system", storage_dir=tiny_storage / "pool",
                        pool_name=f"fault-full-{uuid.uuid4().hex[:8]}")
    made: list[uuid.UUID] = []
    drv.made = made  # type: ignore[attr-defined]
    try:
        yield drv
    finally:
        try:
            for vm_id in made:
                drv.delete_vm(vm_id)
        finally:
            drv.forget_storage_pool()  # this pool, by its name
            drv.close()


def spec(driver: HypervisorDriver, mode: CloneMode) -> VmSpec:
    vm_id = uuid.uuid4()
    driver.made.append(vm_id)  # type: ignore[attr-defined]
    return VmSpec(vm_id=vm_id, name=f"fault-full-{vm_id.hex[:8]}", base_volume="base.qcow2",
                  clone_mode=mode, mac=new_mac(), memory_mib=64,
                  metadata=VmMetadata(desktop_id=vm_id, desktop_name="fault-full",
                                      template_version_id=uuid.uuid4(),
                                      installation_id=DRIVER_TEST_INSTALLATION))


def test_a_full_clone_that_fills_the_storage_fails_cleanly_and_spares_the_running_vm(
    driver: HypervisorDriver, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DATA_MIB}M", str(base)],
                   check=True, capture_output=True)
    driver.import_volume("base.qcow2", base)
    running = spec(driver, CloneMode.LINKED)
    driver.create_vm(running)
    driver.start_vm(running.vm_id)

    full = spec(driver, CloneMode.FULL)
    with pytest.raises(DeskpoolError) as failure:
        driver.create_vm(full)
    assert "space" in str(failure.value).lower(), failure.value
    assert full.vm_id not in {vm.vm_id for vm in driver.list_vms()}
    assert not set(owned_volume_names(full.vm_id)) & set(driver.list_volumes())
    assert driver.get_vm(running.vm_id).power_state is PowerState.RUNNING
    assert "base.qcow2" in driver.list_volumes()
