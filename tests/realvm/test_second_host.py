"""A second libvirt host on this machine (``tests/libvirt_hosts.py``): deskpool's driver boots
the project's image there, the system host does not see it, and its guests survive a SIGKILL of
the host's daemon: after a restart libvirt lists them running again and their agents answer."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from deskpool.domain.errors import AgentUnavailable, HypervisorUnreachable
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
from deskpool.drivers.base import HypervisorDriver, root_volume_name
from deskpool.drivers.libvirt.xml import agent_connected
from deskpool.drivers.registry import open_driver, release_driver
from deskpool.images.builder import GuestImage
from tests.conftest import DRIVER_TEST_INSTALLATION
from tests.libvirt_hosts import SecondLibvirtHost

pytestmark = pytest.mark.realvm

BASE, KERNEL, INITRD = "h2-base.qcow2", "h2-vmlinuz", "h2-initrd.img"


@pytest.fixture(scope="module")
def host2(guest_image: GuestImage) -> Iterator[SecondLibvirtHost]:
    with SecondLibvirtHost() as host:
        print(f"\n[host2] {host.uri} answered {host.last_start_s:.2f} s after start "
              "(QEMU capability probe not included)")
        yield host


def _import_image(driver: HypervisorDriver, image: GuestImage) -> None:
    driver.import_volume(BASE, image.disk, image.disk_sha256)
    driver.import_volume(KERNEL, image.kernel)
    driver.import_volume(INITRD, image.initrd)


def _spec(image: GuestImage, name: str) -> VmSpec:
    vm_id = uuid.uuid4()
    identity = DesktopIdentity(vm_id, name, new_mac(), new_machine_id())
    return VmSpec(
        vm_id=vm_id, name=name, base_volume=BASE, clone_mode=CloneMode.LINKED,
        mac=identity.mac, domain_type=DomainType.QEMU,
        metadata=VmMetadata(vm_id, name, installation_id=DRIVER_TEST_INSTALLATION),
        direct_boot=DirectBoot(KERNEL, INITRD, image.cmdline),
        identity_text=identity.to_guest_text(),
    )


def _wait_for_agent(
    driver: HypervisorDriver, host: SecondLibvirtHost, spec: VmSpec, timeout_s: float
) -> float:
    try:
        return GuestAgent(driver, spec.vm_id).wait_until_ready(timeout_s)
    except AgentUnavailable as exc:
        raise AssertionError(f"{exc}\n{_diagnose(host, spec)}") from exc


def _diagnose(host: SecondLibvirtHost, spec: VmSpec) -> str:
    """What the host knows about a guest whose agent stays silent."""
    lines = []
    try:
        conn = libvirt.open(host.uri)
        try:
            dom = conn.lookupByUUIDString(str(spec.vm_id))
            lines.append(f"state, reason: {dom.state(0)}; cpu time "
                         f"{dom.info()[4] / 1e9:.1f} s; agent channel connected: "
                         f"{agent_connected(dom.XMLDesc(0))}")
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        lines.append(f"libvirt: {exc}")
    lines.append(f"QEMU processes: {host.qemu_pids()}")
    lines.append(host.qemu_log(spec.name))
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def test_guest_on_the_second_host_survives_a_daemon_kill_and_restart(
    host2: SecondLibvirtHost, guest_image: GuestImage
) -> None:
    driver = open_driver(host2.uri, storage_dir=host2.storage_dir)
    try:
        assert driver.capacity().domain_types == ("qemu",)  # TCG only: no /dev/kvm for its user
        started = time.monotonic()
        _import_image(driver, guest_image)
        print(f"[host2] image imported in {time.monotonic() - started:.1f} s")
        spec = _spec(guest_image, "h2-desk-01")
        driver.create_vm(spec)
        started = time.monotonic()
        driver.start_vm(spec.vm_id)
        waited = _wait_for_agent(driver, host2, spec, 180)
        print(f"[host2] boot to guest agent: {time.monotonic() - started:.1f} s "
              f"(agent wait {waited:.1f} s)")
        assert GuestAgent(driver, spec.vm_id).host_name() == spec.name
        console = driver.console_address(spec.vm_id)
        assert host2.vnc_ports[0] <= console.port <= host2.vnc_ports[1]
        with socket.create_connection((console.host, console.port), timeout=5) as conn:
            assert conn.recv(12).startswith(b"RFB 003.")
        root = root_volume_name(spec.vm_id)
        assert driver.volume_info(root).backing_volume_path == str(host2.storage_dir / BASE)
    finally:
        release_driver(driver)

    # The system host knows nothing of it.
    system = libvirt.open("qemu:///system")
    try:
        with pytest.raises(libvirt.libvirtError):
            system.lookupByUUIDString(str(spec.vm_id))
    finally:
        system.close()

    qemu_before = host2.qemu_pids()
    assert set(qemu_before) == {spec.name}
    daemon_pid = host2.daemon_pid
    host2.kill_daemon()
    assert daemon_pid is not None and not _alive(daemon_pid)
    with pytest.raises(HypervisorUnreachable):
        open_driver(host2.uri, storage_dir=host2.storage_dir)
    assert all(_alive(pid) for pid in qemu_before.values()), "QEMU died with the daemon"
    libvirt.open("qemu:///system").close()  # the system daemon is unaffected

    took = host2.start_daemon()
    print(f"[host2] daemon restarted, answering after {took:.2f} s")
    assert host2.qemu_pids() == qemu_before  # re-attached, not restarted
    driver = open_driver(host2.uri, storage_dir=host2.storage_dir)
    try:
        assert spec.vm_id in {vm.vm_id for vm in driver.list_vms()}
        assert driver.get_vm(spec.vm_id).power_state is PowerState.RUNNING
        waited = _wait_for_agent(driver, host2, spec, 30)
        print(f"[host2] agent answered {waited:.2f} s after the restart")
        assert GuestAgent(driver, spec.vm_id).host_name() == spec.name
        assert {BASE, KERNEL, INITRD, root} <= set(driver.list_volumes())
        assert (host2.storage_dir / root).is_file()

        driver.delete_vm(spec.vm_id)
        assert root not in driver.list_volumes()
        assert not host2.qemu_pids()
    finally:
        release_driver(driver)


def test_closing_the_host_after_a_kill_leaves_no_daemon_guest_or_directory(
    guest_image: GuestImage,
) -> None:
    host = SecondLibvirtHost()
    with host:
        driver = open_driver(host.uri, storage_dir=host.storage_dir)
        try:
            _import_image(driver, guest_image)
            spec = _spec(guest_image, "h2-desk-02")
            driver.create_vm(spec)
            driver.start_vm(spec.vm_id)
        finally:
            release_driver(driver)
        base, qemu = host.base_dir, host.qemu_pids()
        assert set(qemu) == {spec.name}
        host.kill_daemon()  # closing must cope with a dead daemon and a running guest
    assert not base.exists()
    assert not any(_alive(pid) for pid in qemu.values())
    assert not host.daemon_running()
    assert not any(str(base) in _cmdline(pid) for pid in _pids())


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
