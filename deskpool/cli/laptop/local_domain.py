"""The checked-out desktop as a domain of the laptop's own libvirt (any URI: ``qemu:///session``
by default), defined from the layer, with the pool's policy enforced and checked twice: on
the XML about to be defined and on what libvirt reads back (``policy_violations``).

The layer's LUKS key reaches QEMU through a libvirt secret that is ephemeral and private
(libvirt never writes it to disk nor shows it), set just before the start and undefined
right after it: QEMU holds the key while the guest runs, and nothing else keeps it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from deskpool.domain.errors import DeskpoolError, Forbidden, NotFound
from deskpool.domain.identity import FWCFG_KEY
from deskpool.domain.offline import OfflinePolicy
from deskpool.offline.laptop_domain import laptop_domain_xml, policy_violations

STOP_WAIT_S = 120.0


def open_libvirt(uri: str) -> Any:
    """A connection to the laptop's libvirt (tests hand their own ``opener`` instead)."""
    import libvirt  # only the commands that run the desktop need the binding

    # Our own messages say what failed; libvirt's default handler would also print each
    # error (a domain not defined yet, looked up on purpose) on stderr.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise DeskpoolError(f"cannot reach libvirt at {uri}: {exc}") from None


Opener = Callable[[str], Any]


def domain_name(desktop: str) -> str:
    return f"deskpool-offline-{desktop}"


@dataclass(frozen=True)
class LocalBoot:
    """Direct kernel boot on the laptop: the template's kernel and initrd, as downloaded."""

    kernel: Path
    initrd: Path
    cmdline: str


def skeleton_xml(desktop: str, *, memory_mib: int, vcpus: int, domain_type: str,
                 boot: LocalBoot | None = None, mac: str | None = None,
                 identity_text: str | None = None) -> str:
    """The desktop's machine before the laptop's rules: its devices are then replaced and
    constrained by ``laptop_domain_xml`` (disk, USB, ports, network, displays). With the
    machine the broker describes, it boots as on its hosts: the same kernel, command line,
    identity (fw_cfg) and MAC."""
    name = escape(domain_name(desktop))
    if boot is None:
        os_boot = "<boot dev='hd'/>"
    else:
        os_boot = (f"<kernel>{escape(str(boot.kernel))}</kernel>"
                   f"<initrd>{escape(str(boot.initrd))}</initrd>"
                   f"<cmdline>{escape(boot.cmdline)}</cmdline>")
    sysinfo = ("" if identity_text is None else
               f"<sysinfo type='fwcfg'><entry name='{escape(FWCFG_KEY)}'>"
               f"{escape(identity_text)}</entry></sysinfo>")
    mac_el = "" if mac is None else f"<mac address='{escape(mac)}'/>"
    return f"""<domain type='{escape(domain_type)}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  {sysinfo}
  <os><type arch='x86_64' machine='q35'>hvm</type>{os_boot}</os>
  <features><acpi/></features>
  <devices>
    <interface type='user'>{mac_el}<model type='virtio'/></interface>
    <graphics type='spice' autoport='yes'/>
    <video><model type='virtio'/></video>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
  </devices>
</domain>
"""


def _secret_xml(secret_uuid: uuid.UUID, layer: Path) -> str:
    return (
        f"<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>"
        f"<usage type='volume'><volume>{escape(str(layer))}</volume></usage></secret>"
    )


def _refuse_violations(xml: str, policy: OfflinePolicy, where: str) -> None:
    found = policy_violations(xml, policy)
    if found:
        raise Forbidden(
            f"the {where} breaks the pool's offline policy, so it is not "
            f"started: {'; '.join(found)}"
        )


def start_local(
    conn: Any,
    desktop: str,
    layer: Path,
    data_key: bytes,
    policy: OfflinePolicy,
    *,
    memory_mib: int = 2048,
    vcpus: int = 2,
    domain_type: str = "kvm",
    boot: LocalBoot | None = None,
    mac: str | None = None,
    identity_text: str | None = None,
) -> str:
    """Define and start the desktop's laptop domain; its name."""
    name = domain_name(desktop)
    secret_uuid = uuid.uuid4()
    xml = laptop_domain_xml(
        skeleton_xml(desktop, memory_mib=memory_mib, vcpus=vcpus, domain_type=domain_type,
                     boot=boot, mac=mac, identity_text=identity_text),
        policy,
        layer_path=str(layer),
        secret_uuid=secret_uuid,
    )
    _refuse_violations(xml, policy, "domain definition")
    secret = conn.secretDefineXML(_secret_xml(secret_uuid, layer))
    try:
        # The passphrase offline_layers uses for the same key: its hex digits.
        secret.setValue(data_key.hex().encode("ascii"))
        dom = conn.defineXML(xml)
        try:
            _refuse_violations(dom.XMLDesc(0), policy, "domain libvirt defined")
            dom.create()
        except BaseException:
            dom.undefine()
            raise
    finally:
        secret.undefine()  # QEMU holds the key now; nothing else keeps it
    return str(name)


def stop_local(
    conn: Any, desktop: str, *, force: bool = False, wait_s: float = STOP_WAIT_S
) -> None:
    """Shut the desktop down (or pull the plug) and drop its definition: the layer on
    disk is all that stays, ready to sync or check in."""
    try:
        dom = conn.lookupByName(domain_name(desktop))
    except Exception as exc:  # libvirtError: no such domain
        raise NotFound(f"desktop {desktop} is not running on this laptop ({exc})") from None
    if dom.isActive():
        if force:
            dom.destroy()
        else:
            dom.shutdown()
            deadline = time.monotonic() + wait_s
            while dom.isActive():
                if time.monotonic() > deadline:
                    raise DeskpoolError(
                        f"desktop {desktop} did not shut down within "
                        f"{wait_s:.0f} s; try again, or --force"
                    )
                time.sleep(0.5)
    dom.undefine()


def is_running(conn: Any, desktop: str) -> bool:
    try:
        dom = conn.lookupByName(domain_name(desktop))
    except Exception:  # libvirtError: not defined, so not running
        return False
    return bool(dom.isActive())
