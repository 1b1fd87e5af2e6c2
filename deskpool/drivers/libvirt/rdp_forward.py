"""The guest's RDP server (xrdp, TCP 3389 in the guest) reached on one port of the host.

Desktops use QEMU's user-mode network (slirp): the guest has no address the host can route
to. QEMU forwards a host port into it when asked (HMP ``hostfwd_add``), as ``-netdev
user,hostfwd=`` does at start; the forward binds the displays' listen address (the host's
loopback), so only the broker's RDP proxy, on the same host, is its way in, and the guest's
xrdp asks for a password (the broker's one-time one) besides.

The forward lives as long as the QEMU process: a restarted, restored or resumed VM has none
until the next ask, and every ask first reads QEMU's own list (``info usernet``), so a
restarted broker finds the forward it made before. No state is kept here.

This goes through libvirt's QEMU monitor passthrough (``qemuMonitorCommand``), which libvirt
records as a "custom-monitor" taint on the domain (a log line, nothing else).
"""

# The XML parsed here (`nosec B314`) is libvirt's own (domain, volume, pool, capabilities
# documents) or deskpool's, never a user's; Python's expat fetches no external entity and
# bounds entity expansion.

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET

import libvirt
import libvirt_qemu

from deskpool.domain.errors import DriverError

RDP_GUEST_PORT = 3389
# info usernet:  TCP[HOST_FORWARD]  15   127.0.0.1 33890   10.0.2.15  3389   0   0
_FORWARD_RE = re.compile(r"TCP\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)")
_ATTEMPTS = 3  # a port taken between our probe and QEMU's bind: try another


def user_netdev(domain_xml: str) -> str | None:
    """The QEMU netdev id of the live domain's user-mode NIC (libvirt names it ``host`` +
    the device's alias, e.g. ``hostnet0``); None when it has none."""
    root = ET.fromstring(domain_xml)  # nosec B314
    for iface in root.findall("./devices/interface[@type='user']"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name"):
            return f"host{alias.get('name')}"
    return None


def forwarded_port(usernet: str, netdev: str, listen: str,
                   guest_port: int = RDP_GUEST_PORT) -> int | None:
    """The host port QEMU forwards from ``listen`` to ``guest_port`` of ``netdev``, from
    ``info usernet``'s text (a ``Hub -1 (hostnet0):`` line, then that netdev's table); None
    without one."""
    section = ""
    for part in re.split(r"^(?=\S.*\(\S+\):\s*$)", usernet, flags=re.MULTILINE):
        if part.split("\n", 1)[0].rstrip().endswith(f"({netdev}):"):
            section = part
    for match in _FORWARD_RE.finditer(section):
        host, port, _guest, to = match.groups()
        if host == listen and int(to) == guest_port:
            return int(port)
    return None


def _free_port(listen: str) -> int:
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((listen, 0))
        return int(probe.getsockname()[1])


def _hmp(dom: libvirt.virDomain, command: str) -> str:
    return str(libvirt_qemu.qemuMonitorCommand(
        dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))


def rdp_forward(dom: libvirt.virDomain, domain_xml: str, listen: str) -> int:
    """The host port on ``listen`` forwarded to the running domain's RDP port, made now if
    QEMU has none. ``DriverError`` when the VM has no user-mode NIC (a bridged guest is
    reached at its own address, which this does not do) or QEMU refuses. Raises
    ``libvirtError`` from the monitor (the caller translates it)."""
    netdev = user_netdev(domain_xml)
    if netdev is None:
        raise DriverError(f"VM {dom.name()} has no user-mode network: its RDP port cannot be "
                          "forwarded")
    found = forwarded_port(_hmp(dom, "info usernet"), netdev, listen)
    if found is not None:
        return found
    answer = ""
    for _ in range(_ATTEMPTS):
        port = _free_port(listen)
        host = f"[{listen}]" if ":" in listen else listen
        answer = _hmp(dom, f"hostfwd_add {netdev} tcp:{host}:{port}-:{RDP_GUEST_PORT}").strip()
        if not answer:  # HMP says nothing when it worked
            return port
    raise DriverError(f"QEMU did not forward a port to the RDP port of VM {dom.name()}: "
                      f"{answer}")
