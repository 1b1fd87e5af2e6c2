"""A desktop's identity and the text format that carries it into the guest.

The broker's database is the source of truth for a desktop's hostname, MAC and machine-id; the
host hands them to the guest at boot (libvirt ``<sysinfo type='fwcfg'>``), and the guest's boot
hook applies them and writes the same text back to ``GUEST_MARKER_PATH`` so the broker can
confirm, through the guest agent, which identity a running guest actually carries.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

from deskpool.domain.errors import InvalidInput

FWCFG_KEY = "opt/deskpool/identity"
GUEST_MARKER_PATH = "/var/lib/deskpool/identity"
_FORMAT_TAG = "deskpool-identity=1"

_HOSTNAME_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# QEMU/KVM's locally administered prefix; libvirt uses it too for generated MACs.
MAC_PREFIX = "52:54:00"


@dataclass(frozen=True)
class DesktopIdentity:
    desktop_id: uuid.UUID
    hostname: str
    mac: str
    machine_id: str

    def __post_init__(self) -> None:
        validate_hostname(self.hostname)
        if not _MAC_RE.match(self.mac):
            raise InvalidInput(f"MAC address {self.mac!r} is not of the form 52:54:00:xx:xx:xx")
        if not _MACHINE_ID_RE.match(self.machine_id):
            raise InvalidInput(f"machine-id {self.machine_id!r} is not 32 lowercase hex digits")

    def to_guest_text(self) -> str:
        """The ``key=value`` lines the guest's boot hook parses (POSIX shell friendly)."""
        return (
            f"{_FORMAT_TAG}\n"
            f"desktop_id={self.desktop_id}\n"
            f"hostname={self.hostname}\n"
            f"mac={self.mac}\n"
            f"machine_id={self.machine_id}\n"
        )

    @classmethod
    def from_guest_text(cls, text: str) -> DesktopIdentity:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines or lines[0] != _FORMAT_TAG:
            raise InvalidInput("identity text does not start with the deskpool-identity=1 tag")
        fields = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
        try:
            return cls(
                desktop_id=uuid.UUID(fields["desktop_id"]),
                hostname=fields["hostname"],
                mac=fields["mac"],
                machine_id=fields["machine_id"],
            )
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"identity text is missing or has a bad field: {exc}") from exc


def validate_hostname(hostname: str) -> str:
    if not _HOSTNAME_RE.match(hostname):
        raise InvalidInput(
            f"hostname {hostname!r} must be 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return hostname


def new_machine_id() -> str:
    return uuid.uuid4().hex


def new_mac(taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A random MAC under QEMU's prefix that is not in ``taken``. Only 24 bits are random, so
    at thousands of desktops a blind draw would collide (about 3 pairs among 10,000)."""
    while True:
        mac = MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
        if mac not in taken:
            return mac
