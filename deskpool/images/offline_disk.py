"""An offline desktop's disk and its encrypted layer, converted both ways on the host.

At check-out the desktop's root overlay (plain qcow2 over the template on the host) becomes
the server's copy of the offline layer: an encrypted layer over the template's image, holding
exactly the clusters the overlay holds (``qemu-img convert -B``: what the base already has is
not copied), so the laptop starts from the desktop as its user left it. At check-in the
layer, as the laptop sent it, becomes the desktop's root again, over the host's copy of the
template: the desktop is online with the user's offline work.

Both write a new file next to the target and rename it over, so a failure leaves the old file
as it was; the key reaches qemu-img through a pipe (``offline_layers``).
"""

from __future__ import annotations

import os
from pathlib import Path

from deskpool.domain.errors import InvalidInput
from deskpool.images.builder import fsync_path
from deskpool.images.offline_layers import (
    _SECRET_ID,
    CLUSTER_SIZE,
    _run,
    check_layer,
    layer_spec,
)

# PBKDF2's minimum iteration time in LUKS, as for a layer made empty: the passphrase is a
# random key, not a password.
_ITER_TIME_MS = 10


def _fresh(target: Path) -> Path:
    """A new, empty 0600 file beside ``target`` to write into first."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return partial


def layer_from_overlay(overlay: Path, layer: Path, base: Path, data_key: bytes) -> None:
    """Make ``layer`` (replacing any) an encrypted layer over ``base`` with the clusters
    ``overlay`` holds; ``overlay``'s own backing file must hold what ``base`` holds (the
    template on the host, ``base`` its copy by checksum)."""
    for path, what in ((overlay, "the desktop's disk"), (base, "the base image")):
        if not path.is_file():
            raise InvalidInput(f"{what} {path} does not exist")
    layer.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a first check-out's
    options = ",".join([
        "encrypt.format=luks", f"encrypt.key-secret={_SECRET_ID}", "encrypt.cipher-alg=aes-256",
        "encrypt.cipher-mode=xts", f"encrypt.iter-time={_ITER_TIME_MS}",
        f"cluster_size={CLUSTER_SIZE}", "extended_l2=on",
    ])
    partial = _fresh(layer)
    try:
        # The backing name is relative to the layer's directory, as for a layer made empty.
        backing = os.path.relpath(base.resolve(), layer.parent.resolve())
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", "-o", options,
              "-B", backing, "-F", "qcow2", str(overlay), str(partial)], data_key,
             f"making the offline layer of {overlay}")
        check_layer(partial, data_key)
        os.replace(partial, layer)
        fsync_path(layer.parent)
    finally:
        partial.unlink(missing_ok=True)


def overlay_from_layer(layer: Path, data_key: bytes, overlay: Path, base: Path) -> None:
    """Replace ``overlay`` (the desktop's root, its VM off) by a plain qcow2 over ``base`` (the
    template on the host) with the clusters ``layer`` holds; its mode and owner kept."""
    if not base.is_file():
        raise InvalidInput(f"the template {base} is not on the host")
    check_layer(layer, data_key)
    old = overlay.stat() if overlay.exists() else None
    partial = _fresh(overlay)
    try:
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", "-B", str(base), "-F", "qcow2",
              layer_spec(layer, with_backing=True), str(partial)], data_key,
             f"rebuilding {overlay} from its offline layer")
        if old is not None:
            os.chmod(partial, old.st_mode & 0o7777)
            os.chown(partial, old.st_uid, old.st_gid)
        os.replace(partial, overlay)
        fsync_path(overlay.parent)
    finally:
        partial.unlink(missing_ok=True)
