"""What goes into a deskpool guest image, and the hash that names a built one.

Three flavors: ``console`` (a text console; small and quick to boot, for tests), ``desktop``
(the console image plus Xorg, LightDM and Xfce's core, booting to a graphical greeter, with
``spice-vdagent`` and ``xrdp``) and ``cloudinit`` (the console image plus Debian's cloud-init,
reading only a local NoCloud seed, and nslcd ready for a join hook to enroll the desktop in an
LDAP directory). ``recipe_for(flavor)`` gives each one's recipe.

The hash covers the recipe's fields (flavor included), every guest file the flavor copies in
(``guest/``, plus ``guest-desktop/`` or ``guest-cloudinit/`` for those flavors; so editing the
identity hook
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
from enum import StrEnum
from pathlib import Path

from deskpool.domain.errors import ImageBuildError, InvalidInput

# Bump when builder.py changes what it produces from the same recipe and guest files.
BUILDER_VERSION = 1

GUEST_FILES_DIR = Path(__file__).resolve().parent / "guest"
# Copied in after guest/ for the desktop flavor only (LightDM settings, its setup step).
DESKTOP_FILES_DIR = Path(__file__).resolve().parent / "guest-desktop"
# Copied in after guest/ for the cloudinit flavor only (cloud-init's settings, its setup step).
CLOUDINIT_FILES_DIR = Path(__file__).resolve().parent / "guest-cloudinit"


class Flavor(StrEnum):
    CONSOLE = "console"
    DESKTOP = "desktop"
    CLOUDINIT = "cloudinit"

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
    # The user layer's rebase (ENGINE_MODULES) runs in the guest at boot, with its Python.
    "python3-minimal",
    "libpython3.11-stdlib",
)

# On top of the console packages, installed without recommends. Measured under TCG (see
# the README): the greeter is on screen ~1 min after create, ~250 MiB used at the greeter.
_DESKTOP_PACKAGES = (
    "xserver-xorg-core",  # its modesetting driver runs on the default VGA (bochs-drm)
    "xserver-xorg-input-libinput",
    "lightdm",
    "lightdm-gtk-greeter",
    "xfce4-session",
    "xfwm4",
    "xfce4-panel",
    "xfdesktop4",
    "xfce4-settings",
    "xfce4-terminal",
    "thunar",
    "dbus-x11",
    # The session bus is the user's systemd one: no dbus-launch per session, and D-Bus
    # activation (xfconfd) works through systemd (see the desktop's session-wrapper).
    "dbus-user-session",
    "xprintidle",  # the X server's input idle time, for the session hook's status
    # xprop/xwininfo: the session hook asks the X server whether the user's desktop is on
    # screen (window manager, panel and background drawn), not only whether its processes run.
    "x11-utils",
    # Registers graphical sessions with logind (who is logged in, idle, locked).
    "libpam-systemd",
    "fonts-dejavu-core",
    "adwaita-icon-theme",
    "spice-vdagent",  # SPICE clients: pointer, resolution, clipboard
    "xrdp",
    "xorgxrdp",  # the X server xrdp's sessions run in (only recommended by xrdp)
    "xauth",  # xrdp's session manager gives its X server a cookie with it (no session without)
    # mount.cifs: the session hook mounts the user's file share (redirected folders) with a
    # credentials file; the kernel's cifs module is kept by the module pruning below.
    "cifs-utils",
)
# On top of the console packages: cloud-init (its settings in guest-cloudinit/ limit it to a
# local NoCloud seed and a short list of modules) and an LDAP name service a join hook can
# switch on: nslcd + libnss-ldapd, installed disabled (the "enrollment-ready" template: desktops
# have no network to install them from at join time, and unjoined ones must not wait on a
# directory they have not been told about).
_CLOUDINIT_PACKAGES = (
    "cloud-init",
    "nslcd",
    "libnss-ldapd",
)
# Kernel module directories (or module files, without .ko) under /lib/modules/*/kernel kept on
# top of the console image's minimal set: the GPU and framebuffer drivers Xorg needs, PS/2
# input, and what later work mounts: an SMB share (cifs and its helpers), a layered root
# (overlay) and encrypted disks (dm-crypt and the key types it can use).
_DESKTOP_KEEP_MODULES = (
    "drivers/gpu",
    "drivers/video",
    "drivers/i2c",
    "drivers/input",
    "drivers/md",
    "fs/overlayfs",
    "fs/smb",
    "fs/cifs",
    "fs/smbfs_common",
    "fs/netfs",
    "fs/fscache",
    "net/dns_resolver",
    "security/keys",
    "drivers/char/tpm",
)
# Checked in the image after pruning: the build fails if one of these no longer loads.
_DESKTOP_REQUIRED_MODULES = ("bochs", "psmouse", "cifs", "overlay", "dm_crypt")

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE_PATH_RE = re.compile(r"^[a-z0-9_][a-z0-9_.+-]*(/[a-z0-9_][a-z0-9_.+-]*)*$")
_MODULE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
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
    flavor: Flavor = Flavor.CONSOLE
    # Module paths under /lib/modules/*/kernel kept besides the console's minimal set.
    keep_modules: tuple[str, ...] = ()
    # Modules that must still load after pruning (the build checks their files and deps).
    required_modules: tuple[str, ...] = ()
    # Memory a VM of this image needs: what ``template publish --built`` gives the version.
    memory_mib: int = 768

    def __post_init__(self) -> None:
        # A plain string (from JSON or the CLI) becomes the enum; an unknown one is refused.
        try:
            object.__setattr__(self, "flavor", Flavor(self.flavor))
        except ValueError:
            raise InvalidInput(f"unknown image flavor {self.flavor!r}; use one of "
                               f"{', '.join(f.value for f in Flavor)}") from None
        for path in self.keep_modules:
            if not _MODULE_PATH_RE.match(path) or ".." in path:
                raise InvalidInput(f"kernel module path {path!r} is not a relative path")
        for name in self.required_modules:
            if not _MODULE_NAME_RE.match(name):
                raise InvalidInput(f"kernel module name {name!r} is not valid")
        if not 128 <= self.memory_mib <= 1024 * 1024:
            raise InvalidInput(f"memory {self.memory_mib} MiB is outside 128 MiB .. 1 TiB")
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
        for rel, path in self.guest_files():
            data = path.read_bytes()
            # Length-prefixed so no two different file sets can produce the same byte stream.
            digest.update(f"\0{rel}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def guest_files(self) -> list[tuple[str, Path]]:
        """The files this flavor copies into the guest, sorted: ``guest/``, then (desktop)
        ``guest-desktop/``, whose files replace same-named ones."""
        merged = dict(iter_guest_files())
        merged.update(iter_engine_files())
        extra = {Flavor.DESKTOP: DESKTOP_FILES_DIR,
                 Flavor.CLOUDINIT: CLOUDINIT_FILES_DIR}.get(self.flavor)
        if extra is not None:
            # An install without them would build (and hash) an image missing its setup.
            if not (extra / "usr/lib/deskpool/flavor-setup.sh").is_file():
                raise ImageBuildError(f"the {self.flavor} flavor's guest files are missing "
                                      f"from {extra}")
            merged.update(iter_guest_files(extra))
        return sorted(merged.items())


# The user layer's rebase engine, copied into every guest under ENGINE_DIR (namespace
# packages: no __init__ files, so nothing else of deskpool is imported there). The guest's
# initramfs runs it with the new root's Python (guest/usr/lib/deskpool/layer-rebase).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
ENGINE_DIR = "usr/lib/deskpool/python/deskpool"
ENGINE_MODULES = ("domain/errors.py", "domain/layers.py", "domain/layer_manifest.py",
                  "domain/dpkg_status.py", "images/layer_tree.py", "images/layer_rebase.py")


def iter_engine_files() -> Iterator[tuple[str, Path]]:
    return iter([(f"{ENGINE_DIR}/{module}", PACKAGE_DIR / module) for module in ENGINE_MODULES])


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


CONSOLE_RECIPE = GuestRecipe()
DESKTOP_RECIPE = GuestRecipe(
    packages=(*_DEFAULT_PACKAGES, *_DESKTOP_PACKAGES),
    # Room for users' files and a few packages on top of the desktop itself.
    image_size_mib=4096,
    flavor=Flavor.DESKTOP,
    keep_modules=_DESKTOP_KEEP_MODULES,
    required_modules=_DESKTOP_REQUIRED_MODULES,
    # ~250 MiB used at the greeter and ~310 MiB in a user's Xfce session (measured under
    # TCG); the rest is headroom for Xorg's and Xfce's growth, applications and page cache.
    memory_mib=1536,
)
CLOUDINIT_RECIPE = GuestRecipe(
    packages=(*_DEFAULT_PACKAGES, *_CLOUDINIT_PACKAGES),
    flavor=Flavor.CLOUDINIT,
)
DEFAULT_RECIPE = CONSOLE_RECIPE
_RECIPES = {Flavor.CONSOLE: CONSOLE_RECIPE, Flavor.DESKTOP: DESKTOP_RECIPE,
            Flavor.CLOUDINIT: CLOUDINIT_RECIPE}


def recipe_for(flavor: Flavor | str) -> GuestRecipe:
    """The project's recipe for an image flavor ("console", "desktop" or "cloudinit")."""
    try:
        return _RECIPES[Flavor(flavor)]
    except ValueError:
        raise InvalidInput(f"unknown image flavor {flavor!r}; use one of "
                           f"{', '.join(f.value for f in Flavor)}") from None
