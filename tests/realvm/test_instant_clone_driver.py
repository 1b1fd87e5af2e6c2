"""Saved guest state on a real guest, through the libvirt driver alone (no database): snapshots
and revert, managed save, and instant clones restored from a captured template.

The guest is the project's own image (direct kernel boot, identity over fw_cfg). Timings are
printed (run with ``-s`` to see them). Everything lives in a storage pool of its own under the
test's temporary directory, removed at the end whatever happens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

import libvirt
import pytest

from deskpool.config import Settings
from deskpool.domain.errors import DeskpoolError, VmNotFound
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import (
    CloneMode,
    DirectBoot,
    DomainType,
    PowerState,
    VmMetadata,
    VmSpec,
)
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import memory_state_volume_name, root_volume_name
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import GuestImage, build_guest_image
from tests.conftest import (
    DRIVER_TEST_INSTALLATION,
    qemu_system_unreachable_reason,
    skip_or_fail_without_real_vms,
)

pytestmark = pytest.mark.realvm

URI = "qemu:///system"
BOOT_TIMEOUT_S = 180
RESTORE_TIMEOUT_S = 60
# After a restore and set_time the guest's clock must be about the host's.
CLOCK_TOLERANCE_S = 5.0


@dataclass
class Host:
    driver: LibvirtDriver
    base: str = ""
    boot: DirectBoot | None = None
    vm_ids: list[uuid.UUID] = field(default_factory=list)

    def spec(self, hostname: str, **changes: Any) -> VmSpec:
        vm_id = uuid.uuid4()
        self.vm_ids.append(vm_id)  # recorded first: the teardown deletes whatever it left
        identity = DesktopIdentity(vm_id, hostname, new_mac(), new_machine_id())
        spec = VmSpec(
            vm_id=vm_id, name=f"dpinstant-{hostname}-{vm_id.hex[:8]}", base_volume=self.base,
            clone_mode=CloneMode.LINKED, mac=identity.mac,
            metadata=VmMetadata(desktop_id=vm_id, desktop_name=hostname,
                                installation_id=DRIVER_TEST_INSTALLATION),
            # TCG: what boots on these machines (facts file); the driver's path is the same.
            domain_type=DomainType.QEMU, direct_boot=self.boot,
            identity_text=identity.to_guest_text(),
        )
        return replace(spec, **changes)


@pytest.fixture(scope="module")
def image() -> GuestImage:
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    return build_guest_image(Settings().image_cache_dir)


def _remove_pool(pool_name: str) -> None:
    conn = libvirt.open(URI)
    try:
        with suppress(libvirt.libvirtError):
            pool = conn.storagePoolLookupByName(pool_name)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def host(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    pool_name = f"dpinstant-{uuid.uuid4().hex[:10]}"
    storage = tmp_path_factory.mktemp("instant") / "pool"
    made = Host(LibvirtDriver(URI, storage_dir=storage, pool_name=pool_name))
    driver = made.driver
    try:
        tag = image.recipe_hash[:12]
        made.base = driver.import_volume(f"guest-{tag}.qcow2", image.disk, image.disk_sha256).name
        kernel = driver.import_volume(f"guest-{tag}.vmlinuz", image.kernel).name
        initrd = driver.import_volume(f"guest-{tag}.initrd", image.initrd).name
        made.boot = DirectBoot(kernel, initrd, image.cmdline)
        yield made
    finally:
        try:
            errors = []
            for vm_id in made.vm_ids:
                try:
                    driver.delete_vm(vm_id)
                except DeskpoolError as exc:
                    errors.append(f"delete_vm({vm_id}): {exc}")
            for name in driver.list_volumes():
                try:
                    driver.delete_volume(name)
                except DeskpoolError as exc:
                    errors.append(f"delete_volume({name}): {exc}")
            assert not errors, errors
        finally:
            driver.close()
            _remove_pool(pool_name)


@pytest.fixture(scope="module")
def template(host: Host) -> VmSpec:
    """A booted guest whose agent answers: the template the instant clones are made from."""
    spec = host.spec("tpl-instant")
    host.driver.create_vm(spec)
    started = time.monotonic()
    host.driver.start_vm(spec.vm_id)
    agent = GuestAgent(host.driver, spec.vm_id)
    agent.wait_until_ready(BOOT_TIMEOUT_S)
    to_agent = time.monotonic() - started
    # The agent starts early in the boot; a template is captured once the boot is over
    # (network up, every device probed), or each clone would finish booting on its own.
    code, out, _ = agent.exec_capture(["systemctl", "is-system-running", "--wait"],
                                      timeout_s=BOOT_TIMEOUT_S, poll_s=0.5)
    assert out.strip() in ("running", "degraded"), (code, out)
    print(f"\ntemplate: boot -> agent {to_agent:.1f} s, -> booted "
          f"{time.monotonic() - started:.1f} s ({out.strip()})")
    return spec


def _sh(agent: GuestAgent, script: str) -> int:
    return agent.exec_capture(["sh", "-c", script])[0]


def _exists(agent: GuestAgent, path: str) -> bool:
    return agent.exec_capture(["test", "-e", path])[0] == 0


def _clock_offset_s(host: Host, vm_id: uuid.UUID) -> float:
    guest_ns = int(host.driver.agent_command(vm_id, "guest-get-time"))
    return abs(guest_ns - time.time_ns()) / 1e9


def test_snapshot_revert_and_suspend_resume_keep_memory(host: Host, template: VmSpec) -> None:
    driver, vm_id = host.driver, template.vm_id
    agent = GuestAgent(driver, vm_id)

    t0 = time.monotonic()
    driver.create_snapshot(vm_id, "factory")
    took_snapshot = time.monotonic() - t0
    assert driver.list_snapshots(vm_id) == ["factory"]
    assert _sh(agent, "echo x > /root/after") == 0
    assert _exists(agent, "/root/after")
    t0 = time.monotonic()
    driver.revert_to_snapshot(vm_id, "factory")
    reverted = time.monotonic() - t0
    agent.wait_until_ready(RESTORE_TIMEOUT_S, poll_s=0.05)
    revert_to_agent = time.monotonic() - t0
    assert driver.get_vm(vm_id).power_state is PowerState.RUNNING
    assert not _exists(agent, "/root/after")  # disk and page cache as at the snapshot
    print(f"snapshot {took_snapshot:.2f} s; revert {reverted:.2f} s, "
          f"revert -> agent {revert_to_agent:.2f} s")

    assert _sh(agent, "echo kept > /run/before-suspend") == 0  # tmpfs: memory only
    t0 = time.monotonic()
    driver.suspend_vm(vm_id)
    suspended = time.monotonic() - t0
    assert driver.get_vm(vm_id).power_state is PowerState.SAVED
    assert not agent.ping()
    t0 = time.monotonic()
    driver.start_vm(vm_id)
    resumed = time.monotonic() - t0
    agent.wait_until_ready(RESTORE_TIMEOUT_S, poll_s=0.05)
    resume_to_agent = time.monotonic() - t0
    assert driver.get_vm(vm_id).power_state is PowerState.RUNNING
    assert agent.read_file("/run/before-suspend") == b"kept\n"
    print(f"suspend {suspended:.2f} s; start {resumed:.2f} s, start -> agent "
          f"{resume_to_agent:.2f} s")

    driver.delete_snapshot(vm_id, "factory")  # its memory would only weigh on the clones' disk
    assert driver.list_snapshots(vm_id) == []
    agent.set_time()  # stale after the revert and the resume: the caller's job there


def _clone(host: Host, disk: str, memory: str, n: int) -> tuple[VmSpec, float, float]:
    """Create one instant clone; (spec, create_vm seconds, create -> agent seconds). Its
    identity_text serves its next cold boot; the running guest keeps the template's."""
    spec = host.spec(f"clone-{n}", clone_mode=CloneMode.INSTANT, base_volume=disk,
                     memory_state_volume=memory, direct_boot=None)
    t0 = time.monotonic()
    record = host.driver.create_vm(spec)
    created = time.monotonic() - t0
    assert record.power_state is PowerState.RUNNING
    GuestAgent(host.driver, spec.vm_id).wait_until_ready(RESTORE_TIMEOUT_S, poll_s=0.05)
    return spec, created, time.monotonic() - t0


def _check_clone(host: Host, template: VmSpec, spec: VmSpec) -> dict[str, str]:
    agent = GuestAgent(host.driver, spec.vm_id)
    deadline = time.monotonic() + 20
    while True:  # the guest takes a moment to probe the new NIC
        nics = {name: mac for name, mac in agent.interfaces().items() if name != "lo"}
        if set(nics.values()) == {spec.mac} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert spec.mac in nics.values(), nics
    assert template.mac not in nics.values(), nics
    assert agent.host_name() == "tpl-instant"  # the template's: identity is the caller's job
    assert _exists(agent, "/run/template-memory")
    agent.set_time()  # stale after the restore: the caller's job (with the identity)
    assert _clock_offset_s(host, spec.vm_id) < CLOCK_TOLERANCE_S
    record = host.driver.get_vm(spec.vm_id)
    assert (record.name, record.metadata, record.power_state) == (
        spec.name, spec.metadata, PowerState.RUNNING)
    return nics


def test_instant_clones_restore_the_template_with_their_own_macs(
    host: Host, template: VmSpec
) -> None:
    driver = host.driver
    template_agent = GuestAgent(driver, template.vm_id)
    assert _sh(template_agent, "echo warm > /run/template-memory") == 0
    t0 = time.monotonic()
    disk, memory = driver.capture_memory_state(template.vm_id)
    captured = time.monotonic() - t0
    assert (disk, memory) == (root_volume_name(template.vm_id),
                              memory_state_volume_name(template.vm_id))
    with pytest.raises(VmNotFound):
        driver.get_vm(template.vm_id)
    size_mib = driver.volume_info(memory).allocation_bytes / 2**20
    print(f"\ncapture {captured:.2f} s, memory state {size_mib:.0f} MiB")
    # Let the saved clock fall visibly behind, so the clock check below means something.
    time.sleep(CLOCK_TOLERANCE_S + 1)

    first, created, to_agent = _clone(host, disk, memory, 1)
    print(f"1 clone: create_vm {created:.2f} s, create -> agent {to_agent:.2f} s")
    nics = _check_clone(host, template, first)
    print(f"clone NICs: {nics}")
    root = driver.volume_info(root_volume_name(first.vm_id))
    assert root.backing_volume_path == driver.volume_info(disk).path

    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda n: _clone(host, disk, memory, n), (2, 3)))
    for spec, created, to_agent in pair:
        print(f"2 clones at once: create_vm {created:.2f} s, create -> agent {to_agent:.2f} s")
        _check_clone(host, template, spec)
    macs = {first.mac} | {spec.mac for spec, _, _ in pair}
    assert len(macs) == 3

    # A clone is an ordinary persistent VM: it reboots cold from its own disk.
    driver.stop_vm(first.vm_id, force=True)
    driver.start_vm(first.vm_id)
    agent = GuestAgent(driver, first.vm_id)
    agent.wait_until_ready(BOOT_TIMEOUT_S)
    agent.exec_capture(["systemctl", "is-system-running", "--wait"], timeout_s=BOOT_TIMEOUT_S)
    assert not _exists(agent, "/run/template-memory")
    assert {n: m for n, m in agent.interfaces().items() if n != "lo"} == {"eth0": first.mac}
    assert agent.host_name() == "clone-1"  # the identity_text it was created with
    for spec in [first] + [spec for spec, _, _ in pair]:
        driver.delete_vm(spec.vm_id)
        assert not {n for n in driver.list_volumes() if n.startswith(str(spec.vm_id))}
    assert {disk, memory} <= set(driver.list_volumes())
