"""A desktop's user layer disk, made on the broker's machine without mounting anything.

The disk is an ext4 file system labelled ``LABEL`` holding a ``LayerDisk`` tree (numbered
generations, a ``current`` link; see ``layer_rebase``): the guest's initramfs mounts it and
lays ``current/upper`` over the template's root (``guest/.../deskpool-layer``). ``mke2fs -d``
writes the tree into the file system image directly, so no loop device or mount is needed;
the sparse raw image is then turned into a qcow2 file holding only what was written.
"""

from __future__ import annotations

import shutil
import subprocess  # nosec B404 - fixed argument lists, no shell
import tempfile
from pathlib import Path

from deskpool.domain.layers import LayerError
from deskpool.images.layer_rebase import LayerDisk

LABEL = "dp-user-layer"  # ext4 labels are at most 16 bytes


def build_layer_disk(path: Path, *, size_mib: int, version: str) -> Path:
    """Write a fresh, empty user layer disk on template version ``version`` to ``path``
    (qcow2, ``size_mib`` MiB virtual). ``path`` must not exist; nothing is left behind on
    failure."""
    if path.exists():
        raise LayerError(f"{path} already exists: a user layer is never overwritten")
    with tempfile.TemporaryDirectory(prefix="deskpool-layer-", dir=path.parent) as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        LayerDisk.create(tree, version)
        raw = Path(tmp) / "layer.raw"
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", LABEL, "-E", "root_owner=0:0",
              "-d", str(tree), str(raw), f"{size_mib}M"], "making the layer's file system")
        partial = path.with_name(path.name + ".partial")
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
              str(partial)], "converting the layer disk to qcow2")
        partial.replace(path)
    return path


def _run(argv: list[str], what: str) -> None:
    if shutil.which(argv[0]) is None:
        raise LayerError(f"{what}: {argv[0]} is not installed (e2fsprogs, qemu-utils)")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # nosec B603
    if done.returncode != 0:
        raise LayerError(f"{what} failed: {done.stderr.strip() or done.returncode}")


def read_layer_file(path: Path, name: str) -> str | None:
    """The text of file ``name`` at the root of the layer disk ``path`` (qcow2 or raw), read
    without mounting it (``qemu-img convert`` to a raw copy, then ``debugfs``); None when the
    disk has no such file. For what the guest leaves there, e.g. why a rebase failed."""
    if "/" in name or not name or name in (".", ".."):
        raise LayerError(f"{name!r} is not a file name at the layer disk's root")
    if not path.is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="deskpool-layer-read-") as tmp:
        raw = Path(tmp) / "layer.raw"
        _run(["qemu-img", "convert", "-q", "-U", "-O", "raw", str(path), str(raw)],
             "copying the layer disk")
        if shutil.which("debugfs") is None:
            raise LayerError("reading the layer disk: debugfs is not installed (e2fsprogs)")
        done = subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)],  # nosec B603
                              capture_output=True, check=False)
        stderr = done.stderr.decode(errors="replace")
        if done.returncode != 0 or "not found" in stderr.lower():
            return None
        return done.stdout.decode(errors="replace")
