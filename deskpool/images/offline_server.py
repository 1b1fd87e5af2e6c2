"""The server's copy of an offline desktop's layer, as files on the host that keeps it.

Layout under one root (the broker's data directory on the fake driver; a libvirt host's
storage directory later), mirroring the laptop's cache so the layer file is the same bytes
on both ends (its backing name is relative, see ``offline_layers.create_encrypted_layer``)::

    bases/<sha256>.qcow2              the template version's image, by checksum
    layers/<desktop id>/layer.qcow2   the desktop's encrypted layer, as last checked in
    layers/<desktop id>/layer.qcow2.manifest   its block manifest (``layer_apply``)
    layers/<desktop id>/staging/undo  the undo journal of a check-in or sync in flight

Only plain file operations: no database, no driver, so a host agent can run them as they are.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import InvalidInput
from deskpool.images.layer_apply import InPlaceCheckin, layer_manifest, roll_back
from deskpool.images.layer_apply import transfer_in_flight as _in_flight
from deskpool.images.layer_delta import LayerDelta
from deskpool.images.offline_layers import create_encrypted_layer


@dataclass(frozen=True)
class ServerLayer:
    root: Path
    desktop_id: uuid.UUID

    @property
    def folder(self) -> Path:
        return self.root / "layers" / str(self.desktop_id)

    @property
    def layer(self) -> Path:
        return self.folder / "layer.qcow2"

    @property
    def staging(self) -> Path:
        return self.folder / "staging"

    def base(self, sha256: str) -> Path:
        return self.root / "bases" / f"{sha256}.qcow2"


def ensure_base(server: ServerLayer, image: Path, sha256: str) -> Path:
    """The template image under its checksum's name: a hard link (a copy across file
    systems), made once. Its checksum is the template's, checked when it was published."""
    target = server.base(sha256)
    if target.exists():
        return target
    if not image.is_file():
        raise InvalidInput(f"the template image {image} is missing")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(image, partial)
    except OSError:
        shutil.copyfile(image, partial)
    os.replace(partial, target)
    return target


def ensure_layer(server: ServerLayer, image: Path, base_sha256: str, data_key: bytes) -> str:
    """The desktop's layer (made empty over the base the first time); its digest."""
    if not server.layer.exists():
        base = ensure_base(server, image, base_sha256)
        server.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_encrypted_layer(server.layer, base, data_key)
    return layer_manifest(server.layer).digest


def open_transfer(server: ServerLayer, delta: LayerDelta, base_sha256: str) -> InPlaceCheckin:
    """The staged check-in (or sync) of ``delta``: made fresh, or resumed where it stopped.
    ``CheckinRefused`` (nothing touched) when its base or starting copy is not the server's."""
    if not server.layer.exists():
        raise InvalidInput(f"desktop {server.desktop_id} has no offline layer on this host")
    return InPlaceCheckin(server.layer, server.staging, delta, expected_base_sha256=base_sha256)


def discard_transfer(server: ServerLayer) -> None:
    """Undo a transfer in flight: the layer is again as it was before it began."""
    if server.layer.exists():
        roll_back(server.layer, server.staging)


def transfer_in_flight(server: ServerLayer) -> bool:
    """Part of a transfer may be in the layer: nothing may read it until it is committed
    or undone."""
    return _in_flight(server.staging)
