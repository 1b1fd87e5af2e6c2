"""The laptop's domain definition: the pool's offline policy enforced in the XML itself."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import VmMetadata
from deskpool.domain.offline import OfflinePolicy
from deskpool.drivers.libvirt import xml
from deskpool.offline.laptop_domain import (
    POLICY_FWCFG_KEY,
    laptop_domain_xml,
    policy_violations,
)

VM_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
SECRET = uuid.UUID("5ec7e700-0000-4000-8000-000000000001")
LAYER = "/home/alice/.local/share/deskpool/lab-001/layer.qcow2"
LOCKED = OfflinePolicy(may_go_offline=True)  # USB and printing forbidden (the defaults)
OPEN = OfflinePolicy(may_go_offline=True, usb_passthrough=True, printing=True, offline_sso=True)

# Everything a server-side definition might carry that a locked laptop must not have.
EXTRAS = """
  <controller type='usb' index='0' model='ich9-ehci1'/>
  <redirdev bus='usb' type='spicevmc'/>
  <redirfilter><usbdev allow='yes'/></redirfilter>
  <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x5678'/>
    </source></hostdev>
  <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0'
    function='0'/></source></hostdev>
  <input type='tablet' bus='usb'/>
  <smartcard mode='passthrough' type='spicevmc'/>
  <parallel type='file'><source path='/tmp/printer.out'/><target port='0'/></parallel>
  <channel type='spiceport'><source channel='org.deskpool.print'/>
    <target type='virtio' name='org.deskpool.print'/></channel>
  <serial type='file'><source path='/tmp/lp'/><target port='1'/></serial>
"""


def server_definition(extras: str = "") -> str:
    """The desktop as the server defines it (the broker's own DomainDefinition), plus extras."""
    text = xml.DomainDefinition(
        domain_type="qemu", name="lab-001", uuid=VM_ID, memory_mib=1536, vcpus=2,
        metadata=VmMetadata(VM_ID, "lab-001"),
        disks=(xml.DiskDevice("/var/lib/deskpool/pool/lab-001.qcow2", "vda"),
               xml.DiskDevice("/var/lib/deskpool/pool/seed.img", "vdb", format="raw",
                              readonly=True)),
        interface=xml.NetworkInterface("52:54:00:aa:bb:cc", network="deskpool"),
        fwcfg_entries={"opt/deskpool/identity": "name=lab-001"},
        vnc_listen="0.0.0.0",
    ).to_xml()
    return text.replace("</devices>", extras + "</devices>")


def devices(domain_xml: str) -> ET.Element:
    found = ET.fromstring(domain_xml).find("devices")
    assert found is not None
    return found


def laptop(policy: OfflinePolicy, extras: str = "") -> str:
    return laptop_domain_xml(server_definition(extras), policy, layer_path=LAYER,
                             secret_uuid=SECRET)


def test_the_server_definition_itself_breaks_a_locked_policy() -> None:
    """So the tests below show the rewrite doing something."""
    found = policy_violations(server_definition(EXTRAS), LOCKED)
    joined = "\n".join(found)
    for needle in ("no <controller type='usb' model='none'/>", "<redirdev>", "<hostdev>",
                   "<serial>", "<console>", "<parallel>", "'org.deskpool.print'",
                   "not LUKS-encrypted", "listens beyond loopback", "<smartcard>",
                   "<input>", "'pci'"):
        assert needle in joined, needle


def test_usb_and_printing_forbidden_leave_no_way_out() -> None:
    text = laptop(LOCKED, EXTRAS)
    assert policy_violations(text, LOCKED) == []
    devs = devices(text)
    controllers = [(c.get("type"), c.get("model")) for c in devs.findall("controller")]
    assert controllers == [("usb", "none")]
    for tag in ("redirdev", "redirfilter", "hostdev", "smartcard", "serial", "parallel",
                "console"):
        assert devs.find(tag) is None, tag
    assert devs.find("input[@bus='usb']") is None
    names = sorted(t.get("name", "") for t in devs.findall("channel/target"))
    assert names == ["com.redhat.spice.0", "org.qemu.guest_agent.0"]


def test_usb_and_printing_allowed_get_redirection_and_keep_ports() -> None:
    text = laptop(OPEN, EXTRAS)
    assert policy_violations(text, OPEN) == []
    devs = devices(text)
    assert [(c.get("type"), c.get("model")) for c in devs.findall("controller")] == [
        ("usb", "qemu-xhci")]
    assert [(r.get("bus"), r.get("type")) for r in devs.findall("redirdev")] == [
        ("usb", "spicevmc")] * 2
    assert devs.find("serial") is not None and devs.find("parallel") is not None
    assert devs.find("hostdev") is None  # no raw host devices even when USB is allowed
    # An allowed-printing document fails a locked policy: the checker reads the policy.
    assert any("printing is forbidden" in v for v in policy_violations(text, LOCKED))
    assert any("USB is forbidden" in v for v in policy_violations(text, LOCKED))


def test_the_only_disk_is_the_encrypted_layer() -> None:
    devs = devices(laptop(LOCKED))
    disks = devs.findall("disk")
    assert len(disks) == 1
    source = disks[0].find("source")
    assert source is not None and source.get("file") == LAYER
    secret = source.find("encryption[@format='luks']/secret")
    assert secret is not None
    assert (secret.get("type"), secret.get("uuid")) == ("passphrase", str(SECRET))


def test_displays_stay_local_and_networking_is_user_mode() -> None:
    devs = devices(laptop(LOCKED))
    graphics = devs.findall("graphics")
    assert {g.get("type") for g in graphics} == {"vnc", "spice"}
    for g in graphics:
        assert g.get("listen") == "127.0.0.1"
        assert [(x.get("type"), x.get("address")) for x in g.findall("listen")] == [
            ("address", "127.0.0.1")]
    (iface,) = devs.findall("interface")
    assert iface.get("type") == "user" and iface.find("source") is None
    mac = iface.find("mac")
    assert mac is not None and mac.get("address") == "52:54:00:aa:bb:cc"


def test_the_guest_is_told_the_policy_and_keeps_its_identity() -> None:
    root = ET.fromstring(laptop(OPEN))
    entries = {e.get("name"): e.text for e in root.findall("sysinfo[@type='fwcfg']/entry")}
    assert entries["opt/deskpool/identity"] == "name=lab-001"
    lines = (entries[POLICY_FWCFG_KEY] or "").splitlines()
    assert "," not in (entries[POLICY_FWCFG_KEY] or "")  # QEMU's option syntax
    assert {k: json.loads(v) for k, v in (line.split("=", 1) for line in lines)} == \
        OPEN.to_dict()
    # Rewriting twice does not stack entries or devices.
    again = laptop_domain_xml(laptop(LOCKED), LOCKED, layer_path=LAYER, secret_uuid=SECRET)
    root2 = ET.fromstring(again)
    assert len(root2.findall(f"sysinfo/entry[@name='{POLICY_FWCFG_KEY}']")) == 1
    assert len(root2.findall("devices/controller")) == 1
    assert policy_violations(again, LOCKED) == []


def test_a_pool_that_may_not_go_offline_gets_no_laptop_domain() -> None:
    with pytest.raises(InvalidInput, match="does not allow"):
        laptop_domain_xml(server_definition(), OfflinePolicy(), layer_path=LAYER,
                          secret_uuid=SECRET)
    with pytest.raises(InvalidInput, match="not a <domain>"):
        policy_violations("<network/>", LOCKED)


@pytest.mark.parametrize("policy", [LOCKED, OPEN], ids=["locked", "open"])
def test_libvirt_accepts_the_laptop_domain_and_keeps_the_policy(policy: OfflinePolicy) -> None:
    """libvirt's test driver (no VM runs) parses and defines it; what it reads back still
    complies. (The test driver has no secrets: the LUKS secret is only checked at start.)"""
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(laptop(policy, EXTRAS))
        try:
            back = dom.XMLDesc(0)
            assert policy_violations(back, policy) == []
            assert f"uuid='{SECRET}'" in back
        finally:
            dom.undefine()
    finally:
        conn.close()
