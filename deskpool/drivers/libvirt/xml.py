"""libvirt XML as small typed objects, in the spirit of virt-manager's ``virtinst``.

Objects emit XML (``to_xml``) and the parts deskpool reads back are parsed from whole documents
(``parse_*``), leaving everything else in the document as libvirt wrote it. No string templates:
values are escaped by ElementTree, so a hostname or path can never inject XML.
"""

# The XML parsed here (`nosec B314`) is libvirt's own (domain, volume, pool, capabilities
# documents) or deskpool's, never a user's; Python's expat fetches no external entity and
# bounds entity expansion.

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from deskpool.domain.identity import FWCFG_KEY
from deskpool.domain.models import VmMetadata

METADATA_NS = "https://deskpool.dev/xmlns/vm/1"
METADATA_PREFIX = "deskpool"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
SPICE_AGENT_CHANNEL = "com.redhat.spice.0"  # spice-vdagent: resize, clipboard, mouse


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attrs)
    if text is not None:
        child.text = text
    return child


def to_string(element: ET.Element) -> str:
    ET.indent(element, space="  ")
    return ET.tostring(element, encoding="unicode") + "\n"


# --- metadata ----------------------------------------------------------------------------


def metadata_element(meta: VmMetadata) -> ET.Element:
    """The element deskpool stores under ``<metadata>`` (namespaced, so other tools keep theirs)."""
    root = ET.Element(f"{{{METADATA_NS}}}vm")
    _sub(root, f"{{{METADATA_NS}}}desktop-id", str(meta.desktop_id))
    _sub(root, f"{{{METADATA_NS}}}desktop-name", meta.desktop_name)
    if meta.template_version_id is not None:
        _sub(root, f"{{{METADATA_NS}}}template-version-id", str(meta.template_version_id))
    if meta.installation_id is not None:
        _sub(root, f"{{{METADATA_NS}}}installation-id", str(meta.installation_id))
    return root


def metadata_xml(meta: VmMetadata) -> str:
    """Metadata as libvirt's ``setMetadata`` wants it: namespace declared on the root."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    return ET.tostring(metadata_element(meta), encoding="unicode")


def parse_metadata(text: str) -> VmMetadata | None:
    """Read deskpool's metadata element. ``virDomainGetMetadata`` returns it with the namespace
    stripped, a full domain document has it namespaced: accept both."""
    try:
        root = ET.fromstring(text)  # nosec B314
    except ET.ParseError:
        return None
    fields = {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in root}
    desktop_id, name = fields.get("desktop-id"), fields.get("desktop-name")
    if not desktop_id or name is None:
        return None
    version, installation = fields.get("template-version-id"), fields.get("installation-id")
    try:
        return VmMetadata(
            desktop_id=uuid.UUID(desktop_id),
            desktop_name=name,
            template_version_id=uuid.UUID(version) if version else None,
            installation_id=uuid.UUID(installation) if installation else None,
        )
    except ValueError:
        return None


# --- domain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskDevice:
    path: str
    target: str  # vda, vdb...
    format: str = "qcow2"
    readonly: bool = False
    serial: str | None = None  # the guest's /dev/disk/by-id/virtio-<serial>

    def to_element(self) -> ET.Element:
        disk = ET.Element("disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=self.format)
        _sub(disk, "source", file=self.path)
        _sub(disk, "target", dev=self.target, bus="virtio")
        if self.serial is not None:
            _sub(disk, "serial", self.serial)
        if self.readonly:
            _sub(disk, "readonly")
        return disk

    def to_xml(self) -> str:
        return to_string(self.to_element())


@dataclass(frozen=True)
class NetworkInterface:
    mac: str
    network: str | None = None  # None: user-mode networking, needs no bridge or dnsmasq

    def to_element(self) -> ET.Element:
        if self.network is None:
            iface = ET.Element("interface", type="user")
        else:
            iface = ET.Element("interface", type="network")
            _sub(iface, "source", network=self.network)
        _sub(iface, "mac", address=self.mac)
        _sub(iface, "model", type="virtio")
        return iface

    def to_xml(self) -> str:
        """The device alone, as ``attachDeviceFlags`` takes it."""
        return to_string(self.to_element())


@dataclass(frozen=True)
class DirectKernelBoot:
    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class DomainDefinition:
    """A desktop VM as deskpool defines it. Emits the full ``<domain>`` document."""

    domain_type: str
    name: str
    uuid: uuid.UUID
    memory_mib: int
    vcpus: int
    metadata: VmMetadata
    disks: tuple[DiskDevice, ...]
    interface: NetworkInterface
    direct_boot: DirectKernelBoot | None = None
    fwcfg_entries: dict[str, str] = field(default_factory=dict)
    vnc_listen: str = "127.0.0.1"  # both displays, VNC and SPICE, listen there
    spice_password: str | None = None
    on_reboot: str = "restart"  # "destroy" for VmSpec.reboot_ends_vm (QEMU's -no-reboot)

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", type=self.domain_type)
        _sub(dom, "name", self.name)
        _sub(dom, "uuid", str(self.uuid))
        meta = _sub(dom, "metadata")
        meta.append(metadata_element(self.metadata))
        _sub(dom, "memory", str(self.memory_mib), unit="MiB")
        _sub(dom, "vcpu", str(self.vcpus))
        if self.fwcfg_entries:
            sysinfo = _sub(dom, "sysinfo", type="fwcfg")
            for key, value in sorted(self.fwcfg_entries.items()):
                _sub(sysinfo, "entry", value, name=key)
        dom.append(self._os_element())
        features = _sub(dom, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        _sub(dom, "clock", offset="utc")
        _sub(dom, "on_poweroff", "destroy")
        _sub(dom, "on_reboot", self.on_reboot)
        _sub(dom, "on_crash", "destroy")
        dom.append(self._devices_element())
        return dom

    def to_xml(self) -> str:
        ET.register_namespace(METADATA_PREFIX, METADATA_NS)
        return to_string(self.to_element())

    def _os_element(self) -> ET.Element:
        os_el = ET.Element("os")
        _sub(os_el, "type", "hvm")
        if self.direct_boot is not None:
            _sub(os_el, "kernel", self.direct_boot.kernel)
            _sub(os_el, "initrd", self.direct_boot.initrd)
            _sub(os_el, "cmdline", self.direct_boot.cmdline)
        else:
            _sub(os_el, "boot", dev="hd")
        return os_el

    def _devices_element(self) -> ET.Element:
        devices = ET.Element("devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        devices.append(self.interface.to_element())
        _sub(devices, "serial", type="pty")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial")
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)
        graphics = _sub(devices, "graphics", type="vnc", port="-1", autoport="yes")
        _sub(graphics, "listen", type="address", address=self.vnc_listen)
        # SPICE for native clients. Its password is set per hand-over (a ticket); until
        # then it is a random one nobody knows, so the port admits no one.
        spice = _sub(devices, "graphics", type="spice", port="-1", autoport="yes")
        if self.spice_password is not None:
            spice.set("passwd", self.spice_password)
        _sub(spice, "listen", type="address", address=self.vnc_listen)
        vdagent = _sub(devices, "channel", type="spicevmc")
        _sub(vdagent, "target", type="virtio", name=SPICE_AGENT_CHANNEL)
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
        rng = _sub(devices, "rng", model="virtio")
        # Entropy at boot, so fresh SSH host keys do not block on an empty pool.
        _sub(rng, "backend", "/dev/urandom", model="random")
        _sub(devices, "memballoon", model="virtio")
        return devices


def fwcfg_identity(identity_text: str) -> dict[str, str]:
    return {FWCFG_KEY: identity_text}


# --- reading live documents ----------------------------------------------------------------


def graphics_with_password(domain_xml: str, protocol: str, password: str,
                           valid_to: str) -> str | None:
    """The live domain's ``protocol`` graphics element with a new password valid until
    ``valid_to`` (UTC, ``YYYY-MM-DDTHH:MM:SS``): what ``updateDeviceFlags`` takes to change it
    in place (its ports and listen addresses must stay as they are). None without one."""
    root = ET.fromstring(domain_xml)  # nosec B314
    graphics = root.find(f"./devices/graphics[@type='{protocol}']")
    if graphics is None:
        return None
    graphics.set("passwd", password)
    graphics.set("passwdValidTo", valid_to)
    return ET.tostring(graphics, encoding="unicode")


@dataclass(frozen=True)
class DisplayListen:
    host: str
    port: int


def parse_display(domain_xml: str, protocol: str = "vnc") -> DisplayListen | None:
    """The ``protocol`` (``vnc`` or ``spice``) display of a live domain; None when it has
    none or no port yet."""
    root = ET.fromstring(domain_xml)  # nosec B314
    graphics = root.find(f"./devices/graphics[@type='{protocol}']")
    if graphics is None:
        return None
    port = int(graphics.get("port", "-1"))
    if port <= 0:
        return None
    listen = graphics.find("listen")
    host = (listen.get("address") if listen is not None else None) or graphics.get("listen")
    return DisplayListen(host=host or "127.0.0.1", port=port)


def parse_interfaces(domain_xml: str) -> list[tuple[str, str]]:
    """(MAC, ``<interface>`` element as XML) of each NIC: what ``detachDeviceFlags`` takes."""
    root = ET.fromstring(domain_xml)  # nosec B314
    found = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        if mac is not None and mac.get("address"):
            found.append((mac.get("address", "").lower(), ET.tostring(iface, encoding="unicode")))
    return found


def agent_connected(domain_xml: str) -> bool:
    """Whether a live domain's guest agent has its channel open (libvirt tracks the state)."""
    root = ET.fromstring(domain_xml)  # nosec B314
    for target in root.findall("./devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def replace_on_reboot(domain_xml: str, action: str) -> str:
    """The document with its ``<on_reboot>`` action set (a saved guest's definition, before
    it is restored: QEMU reads it as a command-line flag at start)."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # nosec B314
    root = ET.fromstring(domain_xml, parser=parser)  # nosec B314
    element = root.find("on_reboot")
    if element is None:
        element = ET.SubElement(root, "on_reboot")
    element.text = action
    return ET.tostring(root, encoding="unicode")


def replace_metadata(domain_xml: str, meta: VmMetadata) -> str:
    """The document with deskpool's metadata element replaced (others' metadata kept)."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # nosec B314
    root = ET.fromstring(domain_xml, parser=parser)  # nosec B314
    container = root.find("metadata")
    if container is None:
        container = ET.Element("metadata")
        name = root.find("name")
        root.insert(list(root).index(name) + 1 if name is not None else 0, container)
    for old in container.findall(f"{{{METADATA_NS}}}vm"):
        container.remove(old)
    container.append(metadata_element(meta))
    return ET.tostring(root, encoding="unicode")


def replace_fwcfg_identity(domain_xml: str, identity_text: str) -> str:
    """The document with the fw_cfg identity entry set to ``identity_text`` (added if absent);
    for a definition's next boot: a running guest has read its entry already."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # nosec B314
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    root = ET.fromstring(domain_xml, parser=parser)  # nosec B314
    sysinfo = root.find("sysinfo[@type='fwcfg']")
    if sysinfo is None:
        sysinfo = ET.Element("sysinfo", type="fwcfg")
        os_el = root.find("os")
        root.insert(list(root).index(os_el) if os_el is not None else len(root), sysinfo)
    entry = sysinfo.find(f"entry[@name='{FWCFG_KEY}']")
    if entry is None:
        entry = _sub(sysinfo, "entry", name=FWCFG_KEY)
    entry.text = identity_text
    return ET.tostring(root, encoding="unicode")


def parse_disk_paths(domain_xml: str) -> list[str]:
    root = ET.fromstring(domain_xml)  # nosec B314
    return [
        src.get("file", "")
        for src in root.findall("./devices/disk/source")
        if src.get("file")
    ]


@dataclass(frozen=True)
class SnapshotDefinition:
    """An internal snapshot: libvirt's default for qcow2 disks, with memory when running."""

    name: str

    def to_xml(self) -> str:
        snapshot = ET.Element("domainsnapshot")
        _sub(snapshot, "name", self.name)
        return to_string(snapshot)


# --- storage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeDefinition:
    name: str
    capacity_bytes: int
    format: str = "qcow2"
    backing_path: str | None = None
    backing_format: str = "qcow2"

    def to_xml(self) -> str:
        vol = ET.Element("volume")
        _sub(vol, "name", self.name)
        _sub(vol, "capacity", str(self.capacity_bytes), unit="bytes")
        target = _sub(vol, "target")
        _sub(target, "format", type=self.format)
        if self.backing_path is not None:
            backing = _sub(vol, "backingStore")
            _sub(backing, "path", self.backing_path)
            _sub(backing, "format", type=self.backing_format)
        return to_string(vol)


@dataclass(frozen=True)
class DirPoolDefinition:
    name: str
    path: str

    def to_xml(self) -> str:
        pool = ET.Element("pool", type="dir")
        _sub(pool, "name", self.name)
        target = _sub(pool, "target")
        _sub(target, "path", self.path)
        return to_string(pool)


def parse_pool_path(pool_xml: str) -> str:
    return ET.fromstring(pool_xml).findtext("./target/path") or ""  # nosec B314


def parse_backing_path(volume_xml: str) -> str | None:
    path = ET.fromstring(volume_xml).findtext("./backingStore/path")  # nosec B314
    return path or None


def parse_volume_format(volume_xml: str) -> str:
    fmt = ET.fromstring(volume_xml).find("./target/format")  # nosec B314
    return (fmt.get("type") if fmt is not None else None) or "raw"


def parse_host_cpu(capabilities_xml: str) -> tuple[str, str]:
    """The host's architecture and CPU model name from libvirt's capabilities."""
    root = ET.fromstring(capabilities_xml)  # nosec B314
    return (root.findtext("./host/cpu/arch") or "", root.findtext("./host/cpu/model") or "")


def parse_guest_domain_types(capabilities_xml: str) -> tuple[str, ...]:
    """Domain types the host offers for hvm guests of its own architecture."""
    root = ET.fromstring(capabilities_xml)  # nosec B314
    host_arch = root.findtext("./host/cpu/arch")
    found: list[str] = []
    for guest in root.findall("./guest"):
        if guest.findtext("os_type") != "hvm":
            continue
        arch = guest.find("arch")
        if arch is None or (host_arch and arch.get("name") != host_arch):
            continue
        for dom in arch.findall("domain"):
            kind = dom.get("type")
            if kind and kind not in found:
                found.append(kind)
    return tuple(found)
