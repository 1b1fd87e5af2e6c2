"""Profile disks made with real mkfs.ext4 and qemu-img (no mounts): base, overlay, check,
checksum, flattening."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.images.profile_disks import (
    allocated_bytes,
    backing_file,
    check_layer,
    create_overlay,
    flatten,
    make_base_disk,
    sha256_of,
    verify_sha256,
)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "qemu-img", "qemu-io", "debugfs")),
    reason="needs e2fsprogs and qemu-utils")
MiB = 2**20


def qemu_io(path: Path, command: str) -> str:
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)],
                          capture_output=True, text=True, check=True)
    assert "error" not in proc.stdout.lower(), proc.stdout
    return proc.stdout


def pattern_at(path: Path, offset: int, length: int, byte: int) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {byte:#x} {offset} {length}", str(path)],
        capture_output=True, text=True, check=False)
    return "Pattern verification failed" not in proc.stdout and proc.returncode == 0


def as_raw(path: Path, tmp: Path) -> Path:
    raw = tmp / f"{path.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    return raw


def test_base_disk_is_a_labelled_ext4_with_the_skeleton_owned_by_the_user(tmp_path: Path
                                                                         ) -> None:
    skel = tmp_path / "skel"
    (skel / ".config").mkdir(parents=True)
    (skel / ".profile").write_text("export EDITOR=vi\n")
    disk = make_base_disk(tmp_path / "ann" / "base.qcow2", 128 * MiB, skeleton=skel,
                          owner=(2001, 2001))
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": 134217728' in info
    assert '"extended-l2": true' in info and '"cluster-size": 65536' in info
    raw = as_raw(disk, tmp_path)
    header = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                            check=True).stdout
    assert "Filesystem volume name:   deskpool-home" in header
    listing = subprocess.run(["debugfs", "-R", "stat /", str(raw)], capture_output=True,
                             text=True, check=True).stdout
    assert "User:  2001" in listing
    cat = subprocess.run(["debugfs", "-R", "cat /.profile", str(raw)], capture_output=True,
                         text=True, check=True).stdout
    assert cat == "export EDITOR=vi\n"
    assert subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode == 0
    assert not list((tmp_path / "ann").glob("*.partial")) and not list(
        (tmp_path / "ann").glob(".raw-*"))


def test_base_disk_refuses_bad_input_and_existing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="too small"):
        make_base_disk(tmp_path / "a.qcow2", MiB)
    with pytest.raises(InvalidInput, match="label"):
        make_base_disk(tmp_path / "a.qcow2", 64 * MiB, label="x" * 17)
    with pytest.raises(NotFound, match="skeleton"):
        make_base_disk(tmp_path / "a.qcow2", 64 * MiB, skeleton=tmp_path / "nope")
    make_base_disk(tmp_path / "a.qcow2", 64 * MiB)
    with pytest.raises(Conflict, match="never overwritten"):
        make_base_disk(tmp_path / "a.qcow2", 64 * MiB)


def test_overlay_reads_its_base_and_keeps_its_writes_to_itself(tmp_path: Path) -> None:
    base = make_base_disk(tmp_path / "base.qcow2", 64 * MiB)
    base_sum = sha256_of(base)
    overlay = create_overlay(base, tmp_path / "session.qcow2")
    assert backing_file(overlay) == "base.qcow2"  # relative: the directory can move
    qemu_io(overlay, "write -P 0xab 40M 4k")
    assert pattern_at(overlay, 40 * MiB, 4096, 0xAB)
    assert sha256_of(base) == base_sum  # the committed layer is untouched
    assert check_layer(overlay).error is None
    with pytest.raises(NotFound):
        create_overlay(tmp_path / "missing.qcow2", tmp_path / "x.qcow2")


def test_a_damaged_layer_fails_its_check_and_its_checksum(tmp_path: Path) -> None:
    base = make_base_disk(tmp_path / "base.qcow2", 64 * MiB)
    overlay = create_overlay(base, tmp_path / "s.qcow2")
    qemu_io(overlay, "write -P 0x11 0 64k")
    good = sha256_of(overlay)
    with overlay.open("r+b") as handle:  # scribble over the L1 table / refcount metadata
        handle.seek(0x30000)
        handle.write(b"\xff" * 65536)
    assert check_layer(overlay).error is not None
    with pytest.raises(Conflict, match="corrupt"):
        verify_sha256(overlay, good)
    assert check_layer(tmp_path / "gone.qcow2").error is not None


def test_flatten_merges_a_chain_and_rebases_the_child_without_changing_data(
        tmp_path: Path) -> None:
    base = make_base_disk(tmp_path / "g1.qcow2", 64 * MiB)
    g2 = create_overlay(base, tmp_path / "g2.qcow2")
    qemu_io(g2, "write -P 0x22 1M 64k")
    g3 = create_overlay(g2, tmp_path / "g3.qcow2")
    qemu_io(g3, "write -P 0x33 2M 4k")
    with pytest.raises(Conflict, match="in use"):
        flatten(g2, tmp_path / "f2.qcow2", child=g3, in_use=[g3])
    g2_sum = sha256_of(g2)
    flat = flatten(g2, tmp_path / "f2.qcow2", child=g3)
    assert backing_file(flat) is None and backing_file(g3) == "f2.qcow2"
    assert sha256_of(g2) == g2_sum  # the old layer is left as it was, for removal later
    base.unlink()
    g2.unlink()
    assert pattern_at(g3, 1 * MiB, 65536, 0x22) and pattern_at(g3, 2 * MiB, 4096, 0x33)
    assert check_layer(g3).error is None


def test_subclusters_keep_small_writes_small(tmp_path: Path) -> None:
    base = make_base_disk(tmp_path / "base.qcow2", 256 * MiB)
    overlay = create_overlay(base, tmp_path / "s.qcow2")
    empty = allocated_bytes(overlay)
    for i in range(64):
        qemu_io(overlay, f"write -P 0x5a {i * 3 * MiB + 8192} 4k")
    grown = allocated_bytes(overlay) - empty
    # 64 scattered 4 KiB writes: far below 64 whole 64 KiB clusters (4 MiB).
    assert grown < 64 * 65536 / 2
