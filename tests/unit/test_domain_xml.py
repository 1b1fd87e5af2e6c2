"""Domain and volume XML: golden files, and libvirt's test:/// driver accepting what we emit."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from deskpool.domain.identity import DesktopIdentity
from deskpool.domain.models import VmMetadata
from deskpool.drivers.libvirt import xml

GOLDEN = Path(__file__).parent / "golden"
VM_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
VERSION_ID = uuid.UUID("99999999-8888-7777-6666-555555555555")
INSTALLATION_ID = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")


def _definition(**overrides: object) -> xml.DomainDefinition:
    identity = DesktopIdentity(VM_ID, "lab-001", "52:54:00:aa:bb:cc", "0" * 31 + "1")
    fields: dict[str, object] = dict(
        domain_type="qemu", name="lab-001", uuid=VM_ID, memory_mib=768, vcpus=2,
        metadata=VmMetadata(VM_ID, "lab-001", VERSION_ID, INSTALLATION_ID),
        disks=(xml.DiskDevice("/pool/root.qcow2", "vda"),
               xml.DiskDevice("/pool/seed.img", "vdb", format="raw", readonly=True)),
        interface=xml.NetworkInterface("52:54:00:aa:bb:cc"),
        direct_boot=xml.DirectKernelBoot("/pool/k", "/pool/i", "root=/dev/vda rw"),
        spice_password="nobody-knows-this",
        fwcfg_entries=xml.fwcfg_identity(identity.to_guest_text()),
    )
    fields.update(overrides)
    return xml.DomainDefinition(**fields)  # type: ignore[arg-type]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_direct_boot_desktop_matches_golden() -> None:
    _check_golden("domain_direct_boot.xml", _definition().to_xml())


def test_disk_boot_on_bridge_network_matches_golden() -> None:
    definition = _definition(
        direct_boot=None, fwcfg_entries={}, disks=(xml.DiskDevice("/pool/root.qcow2", "vda"),),
        interface=xml.NetworkInterface("52:54:00:aa:bb:cc", network="default"),
    )
    _check_golden("domain_disk_boot.xml", definition.to_xml())


def test_volume_definitions_match_golden() -> None:
    linked = xml.VolumeDefinition("r.qcow2", 2**30, backing_path="/pool/base.qcow2")
    _check_golden("volume_linked.xml", linked.to_xml())
    _check_golden("volume_full.xml", xml.VolumeDefinition("r.qcow2", 2**30).to_xml())


def test_values_are_escaped_not_interpolated() -> None:
    definition = _definition(name="a<b>&c", fwcfg_entries={"opt/x": "</entry><evil/>"})
    text = definition.to_xml()
    assert "<evil/>" not in text and "&lt;/entry&gt;&lt;evil/&gt;" in text
    assert "<name>a&lt;b&gt;&amp;c</name>" in text


def test_metadata_round_trips_namespaced_and_stripped() -> None:
    meta = VmMetadata(VM_ID, "lab-001", VERSION_ID, INSTALLATION_ID)
    assert xml.parse_metadata(xml.metadata_xml(meta)) == meta
    stripped = (f"<vm><desktop-id>{VM_ID}</desktop-id><desktop-name>lab-001</desktop-name>"
                f"<installation-id>{INSTALLATION_ID}</installation-id></vm>")
    assert xml.parse_metadata(stripped) == VmMetadata(VM_ID, "lab-001", None, INSTALLATION_ID)
    older = f"<vm><desktop-id>{VM_ID}</desktop-id><desktop-name>lab-001</desktop-name></vm>"
    assert xml.parse_metadata(older) == VmMetadata(VM_ID, "lab-001", None, None)
    assert xml.parse_metadata("<vm><desktop-id>not-a-uuid</desktop-id></vm>") is None
    assert xml.parse_metadata("not xml") is None


def test_libvirt_test_driver_accepts_and_keeps_our_definition() -> None:
    conn = libvirt.open("test:///default")
    definition = _definition(domain_type="test", name=f"golden-{uuid.uuid4().hex[:8]}",
                             uuid=uuid.uuid4())
    dom = conn.defineXML(definition.to_xml())
    try:
        live = dom.XMLDesc(0)
        assert "opt/deskpool/identity" in live
        assert "org.qemu.guest_agent.0" in live
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml.METADATA_NS, 0)
        assert xml.parse_metadata(text) == definition.metadata
        assert xml.parse_disk_paths(live) == ["/pool/root.qcow2", "/pool/seed.img"]
    finally:
        dom.undefine()
        conn.close()


@pytest.mark.parametrize(
    ("graphics", "expected"),
    [
        ("<graphics type='vnc' port='5901'><listen type='address' address='127.0.0.1'/>"
         "</graphics>", xml.DisplayListen("127.0.0.1", 5901)),
        ("<graphics type='vnc' port='-1' autoport='yes'/>", None),
        ("", None),
    ],
)
def test_parse_vnc(graphics: str, expected: xml.DisplayListen | None) -> None:
    assert xml.parse_display(f"<domain><devices>{graphics}</devices></domain>") == expected


def test_guest_domain_types_from_capabilities() -> None:
    caps = """<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
      <guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>
        <domain type='kvm'/></arch></guest>
      <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/></arch></guest>
    </capabilities>"""
    assert xml.parse_guest_domain_types(caps) == ("qemu", "kvm")


def test_a_new_password_changes_only_the_password_of_that_display() -> None:
    live = _definition().to_xml().replace("port=\"-1\"", "port=\"5901\"", 1)
    changed = xml.graphics_with_password(live, "spice", "t1cket", "2026-12-06T10:00:00")
    assert changed is not None
    element = ET.fromstring(changed)
    assert (element.get("type"), element.get("passwd"), element.get("passwdValidTo")) == (
        "spice", "t1cket", "2026-12-06T10:00:00")
    assert element.find("listen") is not None  # its listen address goes back unchanged
    no_vnc_password = ET.fromstring(live).find("./devices/graphics[@type='vnc']")
    assert no_vnc_password is not None and no_vnc_password.get("passwd") is None
    assert xml.graphics_with_password("<domain><devices/></domain>", "spice", "x", "y") is None


def test_a_vm_that_a_reboot_ends_is_defined_and_restored_with_on_reboot_destroy() -> None:
    # Stateless desktops: QEMU runs with -no-reboot, so a reboot inside the guest ends it.
    assert ET.fromstring(_definition().to_xml()).findtext("on_reboot") == "restart"
    ending = _definition(on_reboot="destroy").to_xml()
    assert ET.fromstring(ending).findtext("on_reboot") == "destroy"
    # A saved guest's definition (an instant clone's), rewritten before it is restored.
    rewritten = xml.replace_on_reboot(_definition().to_xml(), "destroy")
    root = ET.fromstring(rewritten)
    assert root.findtext("on_reboot") == "destroy"
    assert len(root.findall("on_reboot")) == 1
    assert root.findtext("name") == ET.fromstring(ending).findtext("name")
