"""A profile layer plugged into a real guest: the guest finds it by its serial, mounts the
ext4 home by label, writes, unmounts; logoff unplugs it (the guest answers the PCI unplug)
and commits it as the next generation; the next session sees the file. On the host the
committed filesystem is checked without mounting it (``debugfs``, ``e2fsck -n``).

The libvirt driver alone and a SQLite database (no broker): the broker does not plug profiles
in yet. One guest, booted once (~20-40 s under TCG); timings printed with ``-s``.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import libvirt
import pytest

from deskpool.config import Settings
from deskpool.domain.errors import DeskpoolError
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import CloneMode, DirectBoot, DomainType, VmMetadata, VmSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import GuestImage, build_guest_image
from deskpool.services.context import ServiceContext
from deskpool.services.profiles import ProfileService
from tests.conftest import (
    DRIVER_TEST_INSTALLATION,
    qemu_system_unreachable_reason,
    skip_or_fail_without_real_vms,
)

pytestmark = pytest.mark.realvm

URI = "qemu:///system"
BOOT_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def image() -> GuestImage:
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    return build_guest_image(Settings().image_cache_dir)


@pytest.fixture(scope="module")
def booted(image: GuestImage, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[LibvirtDriver, uuid.UUID]]:
    pool_name = f"prof-{uuid.uuid4().hex[:10]}"
    storage = tmp_path_factory.mktemp("profile-hotplug") / "pool"
    driver = LibvirtDriver(URI, storage_dir=storage, pool_name=pool_name)
    vm_id = uuid.uuid4()
    try:
        tag = image.recipe_hash[:12]
        base = driver.import_volume(f"guest-{tag}.qcow2", image.disk, image.disk_sha256).name
        boot = DirectBoot(driver.import_volume(f"guest-{tag}.vmlinuz", image.kernel).name,
                          driver.import_volume(f"guest-{tag}.initrd", image.initrd).name,
                          image.cmdline)
        identity = DesktopIdentity(vm_id, "prof-desk", new_mac(), new_machine_id())
        driver.create_vm(VmSpec(
            vm_id=vm_id, name=f"prof-hotplug-{vm_id.hex[:8]}", base_volume=base,
            clone_mode=CloneMode.LINKED, mac=identity.mac,
            metadata=VmMetadata(desktop_id=vm_id, desktop_name="prof-desk",
                                installation_id=DRIVER_TEST_INSTALLATION),
            domain_type=DomainType.QEMU, direct_boot=boot,
            identity_text=identity.to_guest_text()))
        started = time.monotonic()
        driver.start_vm(vm_id)
        GuestAgent(driver, vm_id).wait_until_ready(BOOT_TIMEOUT_S)
        print(f"\nboot -> agent {time.monotonic() - started:.1f} s")
        yield driver, vm_id
    finally:
        try:
            with suppress(DeskpoolError):
                driver.delete_vm(vm_id)
            for name in driver.list_volumes():
                with suppress(DeskpoolError):
                    driver.delete_volume(name)
        finally:
            driver.close()
            conn = libvirt.open(URI)
            with suppress(libvirt.libvirtError):
                pool = conn.storagePoolLookupByName(pool_name)
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
            conn.close()


def sh(agent: GuestAgent, script: str, timeout_s: float = 60) -> str:
    code, out, err = agent.exec_capture(["sh", "-c", script], timeout_s=timeout_s)
    assert code == 0, (script, code, out, err)
    return out


def mount_script(serial: str) -> str:
    """What the guest's session start will do: wait for the disk by serial, check the label,
    mount it."""
    dev = f"/dev/disk/by-id/virtio-{serial}"
    return (f"t0=$(date +%s.%N); for i in $(seq 300); do [ -e {dev} ] && break; sleep 0.1; "
            f"done; t1=$(date +%s.%N); "
            f"test \"$(blkid -s LABEL -o value {dev})\" = deskpool-home && "
            f"mkdir -p /mnt/home && mount {dev} /mnt/home && t2=$(date +%s.%N) && "
            f"echo \"device after $(echo \"$t1 - $t0\" | awk '{{print $1 - $3}}') s, "
            f"mounted after $(echo \"$t2 - $t0\" | awk '{{print $1 - $3}}') s\"")


def test_a_guest_mounts_its_profile_by_serial_and_the_next_session_sees_its_files(
        booted: tuple[LibvirtDriver, uuid.UUID], tmp_path: Path) -> None:
    driver, vm_id = booted
    agent = GuestAgent(driver, vm_id)
    skel = tmp_path / "skel"
    skel.mkdir()
    (skel / ".profile").write_text("from the skeleton\n")
    ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
    try:
        service = ProfileService(ctx, tmp_path / "profiles", skeleton=skel)
        service.ensure_profile("ann", owner=(0, 0), quota_bytes=128 * 2**20)

        t0 = time.monotonic()
        first = service.start_session("ann", "prof-desk", driver, vm_id)
        attached = time.monotonic() - t0
        print("\nfirst session: " + sh(agent, mount_script(first.serial)).strip())
        mounted = time.monotonic() - t0
        assert sh(agent, "cat /mnt/home/.profile") == "from the skeleton\n"
        sh(agent, "echo 'written on desk A' > /mnt/home/notes.txt && umount /mnt/home")
        t0 = time.monotonic()
        logoff = service.end_session(first.layer_id, driver, vm_id)
        print(f"attach {attached:.2f} s, guest mount {mounted:.2f} s, "
              f"detach+check+commit {time.monotonic() - t0:.2f} s")
        assert logoff.committed and logoff.generation == 2
        assert driver.attached_disks(vm_id) == {}  # the guest let go of it

        raw = tmp_path / "g2.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(first.path), str(raw)],
                       check=True)
        assert subprocess.run(["debugfs", "-R", "cat /notes.txt", str(raw)],
                              capture_output=True, text=True, check=True
                              ).stdout == "written on desk A\n"
        assert subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode == 0

        second = service.start_session("ann", "prof-desk", driver, vm_id)
        print("second session: " + sh(agent, mount_script(second.serial)).strip())
        assert sh(agent, "cat /mnt/home/notes.txt") == "written on desk A\n"
        sh(agent, "umount /mnt/home")
        assert service.end_session(second.layer_id, driver, vm_id).generation == 3
    finally:
        ctx.close()
