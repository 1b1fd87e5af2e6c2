"""What goes into a deskpool guest image, and the hash that names a built one.

The hash covers the recipe's fields, every file under ``guest/`` (so editing the identity hook
rebuilds the image), ``KERNEL_CMDLINE`` and ``BUILDER_VERSION`` (bumped when the build steps
change). It names the recipe, not the package versions Debian served:
``build_guest_image(force=True)`` refreshes those.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deskpool.domain.errors import InvalidInput

# Bump when builder.py changes what it produces from the same recipe and guest files.
BUILDER_VERSION = 1

GUEST_FILES_DIR = Path(__file__).resolve().parent / "guest"

# Direct kernel boot. `quiet` keeps the slow emulated VGA console from throttling boot under
# TCG (warnings still reach tty0); the last console= is /dev/console, so systemd's status lines
# go to the serial log. net.ifnames=0 keeps the NIC named eth0 for /etc/network/interfaces.
KERNEL_CMDLINE = "root=/dev/vda rw console=tty0 console=ttyS0,115200 net.ifnames=0 quiet"

_DEFAULT_PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    # logind (handles the ACPI power button, so libvirt's shutdown works) needs the system bus.
    "dbus",
    "qemu-guest-agent",
    "ifupdown",
    "isc-dhcp-client",
    # initramfs-tools compresses with zstd only if it is installed; it decompresses fast in TCG.
    "zstd",
)

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Files an editor or Python may leave next to the guest files; they must not change the hash.
_IGNORED_SUFFIXES = ("~", ".swp", ".pyc", ".orig", ".rej")


@dataclass(frozen=True)
class GuestRecipe:
    suite: str = "bookworm"
    packages: tuple[str, ...] = _DEFAULT_PACKAGES
    image_size_mib: int = 2048
    # mmdebstrap MIRROR arguments ("deb ..." lines, URIs or sources files). Empty: mmdebstrap's
    # default, deb.debian.org plus the -updates and security archives for a stable suite.
    mirrors: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _SUITE_RE.match(self.suite):
            raise InvalidInput(f"Debian suite {self.suite!r} is not a valid suite name")
        for name in self.packages:
            if not _PACKAGE_RE.match(name):
                raise InvalidInput(f"package name {name!r} is not a valid Debian package name")
        if not 512 <= self.image_size_mib <= 1024 * 1024:
            raise InvalidInput(f"image size {self.image_size_mib} MiB is outside 512 MiB .. 1 TiB")

    def content_hash(self) -> str:
        """sha256 (hex) of the fields, the guest files and ``BUILDER_VERSION``."""
        digest = hashlib.sha256()
        # The command line belongs to the image (root=/dev/vda: no partition table).
        header = {
            "builder_version": BUILDER_VERSION,
            "cmdline": KERNEL_CMDLINE,
            "recipe": asdict(self),
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        for rel, path in iter_guest_files():
            data = path.read_bytes()
            # Length-prefixed so no two different file sets can produce the same byte stream.
            digest.update(f"\0{rel}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()


def iter_guest_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(path relative to the guest's /, path on disk) for each guest file, sorted by path."""
    base = root if root is not None else GUEST_FILES_DIR
    files = []
    for path in base.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if path.name.endswith(_IGNORED_SUFFIXES):
            continue
        files.append((path.relative_to(base).as_posix(), path))
    return iter(sorted(files))


DEFAULT_RECIPE = GuestRecipe()
