"""The domain a laptop defines for a checked-out desktop, with the pool's policy enforced in it.

The server's definition of the desktop is rewritten for the laptop (``laptop_domain_xml``):

* USB forbidden: every USB controller is replaced by ``<controller type='usb' model='none'/>``
  (with no controller at all libvirt would add a default one), and USB redirection, USB host
  devices, USB input devices and smartcards are removed. USB allowed: an xHCI controller and two
  SPICE redirection channels, the way a user hands a stick to the guest.
* Printing forbidden: no serial or parallel port, no console on one, and no channel but the
  guest agent's and SPICE's vdagent (a spiceport or other named channel could carry a print
  job out). Printing allowed: the definition's own ports are kept.
* Always: the only disk is the laptop's encrypted layer, declared LUKS with the libvirt secret
  that holds its key; displays listen on loopback only; networking is user-mode (what
  ``qemu:///session`` can do without privileges); no PCI or other host device passthrough.
* The policy itself is handed to the guest (fw_cfg ``opt/deskpool/offline-policy``) so guest
  components can honour what is not a device: no single sign-on offline unless allowed.

``policy_violations`` checks a document against the policy; the client runs it on the XML it is
about to define (and on what libvirt reads back) and refuses to start on any finding, so a
definition built some other way cannot slip a device past the policy.
"""

# The XML parsed here (bandit's B314 is waived below) is deskpool's own definition or
# libvirt's, never one from a user; Python's expat fetches no external entity and bounds
# entity expansion.

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET

from deskpool.domain.errors import InvalidInput
from deskpool.domain.offline import OfflinePolicy

AGENT_CHANNEL = "org.qemu.guest_agent.0"
SPICE_AGENT_CHANNEL = "com.redhat.spice.0"
KEPT_CHANNELS = frozenset({AGENT_CHANNEL, SPICE_AGENT_CHANNEL})
POLICY_FWCFG_KEY = "opt/deskpool/offline-policy"
LOOPBACK = "127.0.0.1"
USB_REDIRECTION_CHANNELS = 2


def _parse(domain_xml: str) -> tuple[ET.Element, ET.Element]:
    try:
        root = ET.fromstring(domain_xml)  # nosec B314
    except ET.ParseError as exc:
        raise InvalidInput(f"the desktop's domain XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise InvalidInput("the desktop's definition is not a <domain> document")
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    return root, devices


def _channel_name(channel: ET.Element) -> str | None:
    target = channel.find("target")
    return None if target is None else target.get("name")


def _is_usb(device: ET.Element) -> bool:
    if device.tag == "controller":
        return device.get("type") == "usb"
    if device.tag in ("redirdev", "redirfilter", "smartcard", "hub"):
        return True
    if device.tag in ("input", "hostdev"):
        return device.get("bus") == "usb" or device.get("type") == "usb"
    return False


def _is_printing_path(device: ET.Element) -> bool:
    if device.tag in ("serial", "parallel", "console"):
        return True
    return device.tag == "channel" and _channel_name(device) not in KEPT_CHANNELS


def _encrypted_layer_disk(layer_path: str, secret_uuid: uuid.UUID) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    source = ET.SubElement(disk, "source", file=layer_path)
    encryption = ET.SubElement(source, "encryption", format="luks")
    ET.SubElement(encryption, "secret", type="passphrase", uuid=str(secret_uuid))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    return disk


def _set_policy_fwcfg(root: ET.Element, policy: OfflinePolicy) -> None:
    sysinfo = next((s for s in root.findall("sysinfo") if s.get("type") == "fwcfg"), None)
    if sysinfo is None:
        sysinfo = ET.Element("sysinfo", type="fwcfg")
        # libvirt wants <sysinfo> before <os>; placing it there keeps the document tidy.
        os_el = root.find("os")
        root.insert(list(root).index(os_el) if os_el is not None else len(root), sysinfo)
    for entry in sysinfo.findall("entry"):
        if entry.get("name") == POLICY_FWCFG_KEY:
            sysinfo.remove(entry)
    entry = ET.SubElement(sysinfo, "entry", name=POLICY_FWCFG_KEY)
    entry.text = policy_text(policy)


def policy_text(policy: OfflinePolicy) -> str:
    """The policy as the guest reads it: one ``key=value`` a line, values in JSON. No comma:
    libvirt hands a fw_cfg string to QEMU's command line, where a comma ends the option
    (a JSON object there made QEMU refuse to start)."""
    text = "".join(f"{key}={json.dumps(value)}\n"
                   for key, value in sorted(policy.to_dict().items()))
    if "," in text:
        raise InvalidInput(f"the offline policy cannot be handed to the guest: {text!r}")
    return text


def laptop_domain_xml(server_domain_xml: str, policy: OfflinePolicy, *, layer_path: str,
                      secret_uuid: uuid.UUID) -> str:
    """The server's definition of the desktop, made into the laptop's, policy enforced."""
    if not policy.may_go_offline:
        raise InvalidInput("the pool does not allow this desktop to go offline")
    root, devices = _parse(server_domain_xml)
    for device in list(devices):
        if (device.tag in ("disk", "hostdev", "redirdev", "redirfilter", "smartcard", "hub")
                or _is_usb(device)
                or (not policy.printing and _is_printing_path(device))):
            devices.remove(device)
    devices.insert(0, _encrypted_layer_disk(layer_path, secret_uuid))
    if policy.usb_passthrough:
        ET.SubElement(devices, "controller", type="usb", index="0", model="qemu-xhci")
        for _ in range(USB_REDIRECTION_CHANNELS):
            ET.SubElement(devices, "redirdev", bus="usb", type="spicevmc")
    else:
        ET.SubElement(devices, "controller", type="usb", index="0", model="none")
    for iface in devices.findall("interface"):
        # qemu:///session has no bridges: user-mode networking, keeping MAC and model.
        keep = [c for c in iface if c.tag in ("mac", "model")]
        iface.clear()
        iface.set("type", "user")
        iface.extend(keep)
    for graphics in devices.findall("graphics"):
        graphics.set("listen", LOOPBACK)
        for listen in graphics.findall("listen"):
            graphics.remove(listen)
        ET.SubElement(graphics, "listen", type="address", address=LOOPBACK)
    _set_policy_fwcfg(root, policy)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def policy_violations(domain_xml: str, policy: OfflinePolicy) -> list[str]:
    """Every way ``domain_xml`` breaks ``policy`` on a laptop, as sentences; [] when none."""
    _, devices = _parse(domain_xml)
    found: list[str] = []
    usb_controllers = [d for d in devices if d.tag == "controller" and d.get("type") == "usb"]
    if not policy.usb_passthrough:
        if not any(c.get("model") == "none" for c in usb_controllers):
            found.append("USB is forbidden but no <controller type='usb' model='none'/> stops "
                         "libvirt adding a default USB controller")
        for device in devices:
            if _is_usb(device) and not (device.tag == "controller"
                                        and device.get("model") == "none"):
                found.append(f"USB is forbidden but the domain has a USB device <{device.tag}>")
    if not policy.printing:
        for device in devices:
            if _is_printing_path(device):
                name = _channel_name(device) if device.tag == "channel" else None
                found.append(f"printing is forbidden but the domain has a <{device.tag}>"
                             + (f" channel {name!r}" if name else ""))
    found.extend(f"host device passthrough <hostdev type={d.get('type')!r}> is not allowed "
                 "on a laptop" for d in devices.findall("hostdev") if d.get("type") != "usb")
    for disk in devices.findall("disk"):
        source = disk.find("source")
        readonly = disk.find("readonly") is not None
        encrypted = source is not None and any(
            e.get("format") == "luks" for e in source.findall("encryption"))
        if disk.get("device", "disk") == "disk" and not readonly and not encrypted:
            found.append("a writable disk is not LUKS-encrypted: "
                         f"{source.get('file') if source is not None else '?'}")
    for graphics in devices.findall("graphics"):
        local = graphics.get("listen") in (LOOPBACK, None) and all(
            (listen.get("type") == "address" and listen.get("address") == LOOPBACK)
            or listen.get("type") in ("socket", "none")
            for listen in graphics.findall("listen"))
        if not local or (graphics.get("listen") is None and not graphics.findall("listen")):
            found.append(f"the {graphics.get('type')} display listens beyond loopback")
    return found
