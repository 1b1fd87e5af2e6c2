"""Profile disks on the host: the qcow2 files of a roaming profile, made and checked with
``mkfs.ext4`` and ``qemu-img`` only (no loop devices, no mounts, no root needed).

Every file is written under a temporary name in its final directory, synced and renamed into
place, so a crash leaves either the whole file or none (plus a ``.partial`` to sweep). A layer
that is committed is never opened for writing again: a session gets a new overlay on it, a
rollback a new empty overlay on an older one, and flattening writes a new standalone copy.

Cluster size: overlays use 64 KiB clusters with ``extended_l2=on`` (32 subclusters of 2 KiB),
so a small guest write allocates a subcluster instead of copying a whole 64 KiB cluster from
the backing file (issue 13 measured 8.3x the changed bytes without it, 1.07x with it;
``bench/p5_profile_bytes.py`` measures it again).

Overlays name their backing file relative to their own directory (all layers of a user share
one), so a user's directory can move to another host or path as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import Conflict, DeskpoolError, InvalidInput, NotFound
from deskpool.domain.profiles import PROFILE_FS_LABEL
from deskpool.images.builder import fsync_path

QCOW2_OPTIONS = "cluster_size=65536,extended_l2=on"
_MIN_SIZE = 64 * 2**20


class ProfileDiskError(DeskpoolError):
    """A profile disk tool failed; the message names the step and the tool's own words."""


def run_tool(step: str, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ProfileDiskError(f"{step}: {cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        raise ProfileDiskError(f"{step} failed ({cmd[0]} exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc


def publish_file(partial: Path, final: Path) -> None:
    """Make ``partial`` durable, then ``final`` in one rename (and make the rename durable)."""
    fsync_path(partial)
    os.replace(partial, final)
    fsync_path(final.parent)


def partial_path(final: Path) -> Path:
    if final.exists():
        raise Conflict(f"profile disk {final} exists already; layers are never overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(final.name + ".partial")


def make_base_disk(path: Path, size_bytes: int, *, skeleton: Path | None = None,
                   owner: tuple[int, int] | None = None,
                   label: str = PROFILE_FS_LABEL) -> Path:
    """A new standalone profile layer: an ext4 filesystem of ``size_bytes`` (the profile's
    quota) labelled ``label``, its root directory owned by ``owner`` (uid, gid) and holding
    a copy of ``skeleton`` (``/etc/skel`` of the guest, say), as a qcow2 file.

    ``mkfs.ext4 -d`` fills the filesystem from a directory without mounting it; files copied
    in keep the host's owners, so pass a skeleton of files owned as they should be, or none.
    ``Conflict`` if ``path`` exists, ``InvalidInput`` for a size under 64 MiB or a label over
    16 bytes, ``NotFound`` for a missing skeleton."""
    if size_bytes < _MIN_SIZE:
        raise InvalidInput(f"a profile disk of {size_bytes} bytes is too small (at least 64 MiB)")
    if not label or len(label.encode()) > 16:
        raise InvalidInput(f"ext4 label {label!r} must be 1-16 bytes")
    if skeleton is not None and not skeleton.is_dir():
        raise NotFound(f"profile skeleton directory {skeleton} does not exist")
    partial = partial_path(path)
    with tempfile.TemporaryDirectory(prefix=".raw-", dir=path.parent) as scratch:
        raw = Path(scratch) / "profile.raw"
        with raw.open("wb") as handle:
            handle.truncate(size_bytes)  # sparse: only what mkfs writes takes space
        cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-m", "0",
               # lazy init keeps the raw file (and so the qcow2) small: the guest kernel
               # initialises the inode tables in the background.
               "-E", "lazy_itable_init=1,lazy_journal_init=1" + (
                   f",root_owner={owner[0]}:{owner[1]}" if owner else "")]
        if skeleton is not None:
            cmd += ["-d", str(skeleton)]
        run_tool("making the profile filesystem", [*cmd, str(raw)])
        run_tool("converting the profile disk to qcow2",
             ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", QCOW2_OPTIONS,
              str(raw), str(partial)])
    publish_file(partial, path)
    return path


def _backing_name(base: Path, overlay: Path) -> str:
    """How ``overlay`` names ``base``: relative when they share a directory."""
    return base.name if base.parent.resolve() == overlay.parent.resolve() else str(base.resolve())


def create_overlay(base: Path, path: Path) -> Path:
    """A new, empty qcow2 layer on ``base`` (a session's layer, or a rollback's): same
    virtual size, 64 KiB clusters with subclusters. ``NotFound`` for a missing base,
    ``Conflict`` if ``path`` exists."""
    if not base.is_file():
        raise NotFound(f"profile layer {base} does not exist")
    partial = partial_path(path)
    # The base is named as it will be seen from ``path``, not from the partial's name (same
    # directory, so the same), and qemu-img reads its size from it.
    run_tool("creating a profile overlay",
         ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
          "-b", _backing_name(base, path), "-o", QCOW2_OPTIONS, str(partial)])
    publish_file(partial, path)
    return path


@dataclass(frozen=True, slots=True)
class LayerCheck:
    """``qemu-img check`` of one layer: ``error`` is None when it is consistent (leaked
    clusters only waste space and are reported in ``leaks``)."""

    error: str | None
    leaks: int = 0


def check_layer(path: Path) -> LayerCheck:
    """Check a layer's qcow2 metadata (never changes it). A missing or unreadable file, or
    corruption, gives an ``error`` sentence rather than an exception: the caller sets the
    layer aside."""
    if not path.is_file():
        return LayerCheck(error=f"{path} is missing")
    proc = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    leaks = int(report.get("leaks", 0))
    if proc.returncode in (0, 3):  # 3: only leaked clusters
        return LayerCheck(error=None, leaks=leaks)
    corruptions = report.get("corruptions")
    detail = (f"{corruptions} corrupt metadata entries" if corruptions
              else (proc.stderr.strip() or f"qemu-img check exit {proc.returncode}")[:300])
    return LayerCheck(error=detail, leaks=leaks)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """``Conflict`` naming the file when a committed layer no longer has its checksum."""
    found = sha256_of(path)
    if found != expected:
        raise Conflict(f"profile layer {path} is corrupt: sha256 {found}, expected {expected}")


def allocated_bytes(path: Path) -> int:
    """Bytes the file takes on disk (sparse holes excluded): what a copy of it carries."""
    return path.stat().st_blocks * 512


def backing_file(path: Path) -> str | None:
    proc = run_tool("reading a profile layer",
                ["qemu-img", "info", "-U", "--output=json", str(path)])
    value = json.loads(proc.stdout).get("backing-filename")
    return str(value) if value else None


def flatten(target: Path, into: Path, *, child: Path | None,
            in_use: Collection[Path] = ()) -> Path:
    """Merge ``target`` and its whole backing chain into the new standalone layer ``into``,
    then point ``child`` (the layer above ``target``, if any) at ``into``.

    ``qemu-img convert`` writes a new file rather than ``qemu-img commit`` folding a layer
    into its parent: a committed layer is never written, so a crash mid-way leaves every
    generation as it was. The child's header is then rebased with ``qemu-img rebase -u``
    (only its backing file name changes; ``into`` holds the same guest data as ``target``).
    A crash between the two leaves ``target`` in place and the child still on it.

    ``Conflict`` when ``target``, ``child`` or ``into`` is in ``in_use`` (the files open
    sessions read): a running QEMU reads its whole chain, and QEMU's image locks would refuse
    the rebase anyway."""
    busy = {p.resolve() for p in in_use}
    for layer in (target, child, into):
        if layer is not None and layer.resolve() in busy:
            raise Conflict(f"profile layer {layer} is in use by a session; flatten it later")
    if not target.is_file():
        raise NotFound(f"profile layer {target} does not exist")
    partial = partial_path(into)
    run_tool("flattening a profile chain",
         ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", "-o", QCOW2_OPTIONS,
          str(target), str(partial)])
    publish_file(partial, into)
    if child is not None:
        rebase_header(child, into)
    return into


def rebase_header(child: Path, base: Path) -> None:
    """Point ``child``'s header at ``base`` (``qemu-img rebase -u``: only the backing file's
    name changes, so ``base`` must hold the same guest data as the child's backing file
    now). A flatten does it onto the flattened copy, and undoes it (back onto the old
    layer) when it loses a race before its commit."""
    run_tool("rebasing a profile layer onto its flattened base",
             ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
              "-b", _backing_name(base, child), str(child)])
    fsync_path(child)


def remove_layer(path: Path, in_use: Collection[Path] = ()) -> None:
    """Delete a layer file no generation needs any more; a missing file is fine."""
    if path.resolve() in {p.resolve() for p in in_use}:
        raise Conflict(f"profile layer {path} is in use by a session")
    path.unlink(missing_ok=True)
