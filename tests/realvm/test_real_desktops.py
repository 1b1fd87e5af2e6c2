"""Real desktops on qemu:///system: clones of the project's own image boot, the guest carries
the identity from the database, and deletion leaves nothing behind (checked through libvirt and
the file system directly, not through deskpool)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest

from deskpool.domain.identity import GUEST_MARKER_PATH, DesktopIdentity
from deskpool.domain.models import CloneMode
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.libvirt.xml import METADATA_NS, parse_metadata
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.views import DesktopView
from tests.realvm.conftest import TEMPLATE

pytestmark = pytest.mark.realvm


@pytest.fixture(scope="module")
def desktops(real_ctx: ServiceContext) -> Iterator[list[DesktopView]]:
    """Two linked clones and one full clone, booted at the same time."""
    service = DesktopService(real_ctx)
    made = [
        service.create(TEMPLATE, pattern="real-{n:02}", wait_ready=False),
        service.create(TEMPLATE, pattern="real-{n:02}", wait_ready=False),
        service.create(TEMPLATE, pattern="real-{n:02}", clone_mode=CloneMode.FULL,
                       wait_ready=False),
    ]
    try:
        with ThreadPoolExecutor(len(made)) as pool:
            # Generous: three TCG guests boot at once here, beside the other lane's real-VM
            # modules; in CI one missed 300 s while five guests shared two CPUs.
            list(pool.map(lambda d: service.wait_ready(d.id, timeout_s=720), made))
        yield [service.get(str(d.id)) for d in made]
    finally:
        for desktop in service.list():
            service.delete(str(desktop.id))


def _agent(ctx: ServiceContext, desktop: DesktopView) -> GuestAgent:
    return GuestAgent(ctx.driver_for_name("local"), desktop.id)


def test_clones_are_ready_and_the_guest_hostname_equals_the_database(
    real_ctx: ServiceContext, desktops: list[DesktopView]
) -> None:
    for desktop in desktops:
        assert desktop.state == "ready", desktop.last_error
        agent = _agent(real_ctx, desktop)
        assert agent.host_name() == desktop.hostname
        marker = DesktopIdentity.from_guest_text(agent.read_file(GUEST_MARKER_PATH).decode())
        assert (marker.hostname, marker.mac, marker.machine_id) == (
            desktop.hostname, desktop.mac, desktop.machine_id)
    (host,) = HostService(real_ctx).list()
    assert host.domain_type in ("qemu", "kvm")  # resolved by the probe, recorded on the host


def test_each_domain_names_the_desktop_and_this_deployment_in_its_metadata(
    real_ctx: ServiceContext, desktops: list[DesktopView]
) -> None:
    """Read from libvirt directly: what a broker finds again after a crash, and what tells
    another deployment sharing the host that these VMs are not its leftovers."""
    conn = libvirt.open("qemu:///system")
    try:
        for desktop in desktops:
            dom = conn.lookupByUUIDString(str(desktop.id))
            meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                               METADATA_NS, 0))
            assert meta is not None
            assert (meta.desktop_id, meta.desktop_name, meta.installation_id) == (
                desktop.id, desktop.name, real_ctx.installation_id)
    finally:
        conn.close()


def test_two_clones_have_different_machine_ids_and_macs_inside_the_guest(
    real_ctx: ServiceContext, desktops: list[DesktopView]
) -> None:
    seen_ids, seen_macs = set(), set()
    for desktop in desktops[:2]:
        agent = _agent(real_ctx, desktop)
        machine_id = agent.read_file("/etc/machine-id").decode().strip()
        macs = {mac for name, mac in agent.interfaces().items() if name != "lo"}
        assert machine_id == desktop.machine_id
        assert desktop.mac in macs
        seen_ids.add(machine_id)
        seen_macs |= macs
    assert len(seen_ids) == 2 and len(seen_macs) == 2


def test_linked_clone_is_an_overlay_and_full_clone_stands_alone(
    storage_dir: Path, desktops: list[DesktopView]
) -> None:
    def backing(desktop: DesktopView) -> str | None:
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(storage_dir /
                                                            f"{desktop.id}-root.qcow2")],
            capture_output=True, text=True, check=True)
        return json.loads(info.stdout).get("backing-filename")

    linked, full = desktops[0], desktops[2]
    assert (linked.clone_mode, full.clone_mode) == ("linked", "full")
    assert backing(linked) is not None and backing(full) is None


def test_console_answers_with_the_vnc_protocol(
    real_ctx: ServiceContext, desktops: list[DesktopView]
) -> None:
    address = DesktopService(real_ctx).console(desktops[0].name)
    with socket.create_connection((address.host, address.port), timeout=5) as conn:
        assert conn.recv(12).startswith(b"RFB 003.")


def test_delete_leaves_no_domain_and_no_disk(
    real_ctx: ServiceContext, storage_dir: Path, desktops: list[DesktopView]
) -> None:
    victim = desktops[-1]
    disk = storage_dir / f"{victim.id}-root.qcow2"
    assert disk.exists()
    DesktopService(real_ctx).delete(victim.name)
    conn = libvirt.open("qemu:///system")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByUUIDString(str(victim.id))
        assert victim.name not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    assert not disk.exists()
    assert not list(storage_dir.glob(f"{victim.id}*"))
