"""The machine a checked-out desktop runs as on the laptop: its size, its MAC, and how it
boots (the template's kernel and initrd for a template booted by direct kernel boot, as the
project's own images are, with the kernel command line and the fw_cfg identity the desktop
has on every host), so it boots there as it does here. The boot files download like the base
(by checksum, resumable), with a transfer slot of the desktop's host.
"""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import InvalidInput, NotFound
from deskpool.images.layer_delta import file_sha256
from deskpool.services.factory import boot_identity, layered_desktop
from deskpool.services.offline import Download, OfflineService

BOOT_FILES = ("kernel", "initrd")


@dataclass(frozen=True)
class BootFile:
    sha256: str
    size: int


@dataclass(frozen=True)
class OfflineMachine:
    vcpus: int
    memory_mib: int
    mac: str
    cmdline: str | None  # direct kernel boot's command line; None: the disk boots itself
    identity_text: str | None  # handed to the guest through fw_cfg, as on its hosts
    kernel: BootFile | None
    initrd: BootFile | None


def _boot_paths(service: OfflineService, user: str, desktop: str,
                laptop: str) -> tuple[uuid.UUID, dict[str, Path]]:
    """The check-out's desktop, and its template's kernel and initrd by name (none for a
    template that boots from its disk), each checked to be there."""
    desktop_id = service.own_checkout_desktop(user, desktop, laptop)
    with service.ctx.uow(read_only=True) as uow:
        tv = uow.desktops.get(desktop_id).template_version
        paths = ({"kernel": Path(tv.kernel_path), "initrd": Path(tv.initrd_path)}
                 if tv.kernel_path and tv.initrd_path else {})
    for which, path in paths.items():
        if not path.is_file():
            raise NotFound(f"the template's {which} {path} is missing on the server")
    return desktop_id, paths


def offline_machine(service: OfflineService, user: str, desktop: str,
                    laptop: str) -> OfflineMachine:
    """The machine of ``desktop``, checked out by ``user`` to ``laptop``."""
    desktop_id, paths = _boot_paths(service, user, desktop, laptop)
    files = {which: BootFile(file_sha256(path), path.stat().st_size)
             for which, path in paths.items()}
    with service.ctx.uow(read_only=True) as uow:
        d = uow.desktops.get(desktop_id)
        tv = d.template_version
        cmdline, identity_text = boot_identity(d, tv, layered=layered_desktop(uow, d))
        return OfflineMachine(vcpus=tv.vcpus, memory_mib=tv.memory_mib, mac=d.mac,
                              cmdline=cmdline, identity_text=identity_text,
                              kernel=files.get("kernel"), initrd=files.get("initrd"))


def open_boot_file(service: OfflineService, user: str, desktop: str, laptop: str,
                   which: str) -> Download:
    """The template's ``kernel`` or ``initrd`` for the laptop, a transfer slot held."""
    if which not in BOOT_FILES:
        raise InvalidInput(f"boot file {which!r} is not kernel or initrd")
    desktop_id, paths = _boot_paths(service, user, desktop, laptop)
    path = paths.get(which)
    if path is None:
        raise NotFound(f"{desktop} boots from its disk: it has no {which} to download")
    hold = ExitStack()
    hold.enter_context(service.transfer_slot(desktop_id))
    return Download(path=path, size=path.stat().st_size, sha256=file_sha256(path), hold=hold)
