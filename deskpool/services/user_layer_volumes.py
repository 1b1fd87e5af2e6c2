"""A stateful desktop's user layer disk on its host (issue 14): made once, with the desktop's
first VM, and then kept through every re-create of the VM (a crash's retry, a repair, a new
template version) until the desktop itself is deleted."""

from __future__ import annotations

import tempfile
import uuid
from contextlib import suppress
from pathlib import Path

from deskpool.domain.errors import NotFound
from deskpool.drivers.base import HypervisorDriver, layer_volume_name
from deskpool.images.user_layer_disk import build_layer_disk


def ensure_layer_volume(driver: HypervisorDriver, desktop_id: uuid.UUID, *, size_mib: int,
                        version: int) -> str:
    """The desktop's layer volume on ``driver``'s host, made empty (on template version
    ``version``) if it has none. One that exists is the user's and is never replaced."""
    name = layer_volume_name(desktop_id)
    with suppress(NotFound):
        driver.volume_info(name)
        return name
    with tempfile.TemporaryDirectory(prefix="deskpool-layer-") as tmp:
        disk = build_layer_disk(Path(tmp) / name, size_mib=size_mib, version=str(version))
        driver.import_volume(name, disk)
    return name


def delete_layer_volume(driver: HypervisorDriver, desktop_id: uuid.UUID) -> None:
    """Remove the desktop's layer volume, if any: only when the desktop itself goes."""
    driver.delete_volume(layer_volume_name(desktop_id))
