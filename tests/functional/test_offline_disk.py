"""An offline desktop's disk and its encrypted layer, both ways, with real qemu-img: the layer
made at check-out holds exactly what the desktop's overlay holds (and reads through to the
same disk); the desktop's disk rebuilt at check-in holds what the laptop wrote over the
host's own copy of the template; a failed rebuild leaves the old disk as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deskpool.images.offline_layers import (
    OfflineLayerError,
    allocated_extents,
    layer_facts,
    layer_from_overlay,
    layer_spec,
    overlay_from_layer,
    read_guest_bytes,
)

MiB = 1024 * 1024


def qemu_io(image: str, *commands: str, key: bytes | None = None) -> str:
    argv = ["qemu-io"]
    if key is not None:
        argv += ["--object", f"secret,id=layerkey0,data={key.hex()}"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, image], capture_output=True, text=True, check=True)
    assert "verification failed" not in result.stdout, result.stdout
    return result.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def desktop_disk(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The host's template (with data), a copy of it under its checksum in the server's
    store, and a desktop's root overlay on the host's copy with the user's writes."""
    host_base = tmp_path / "pool" / "template.qcow2"
    host_base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(host_base), "256M"],
                   check=True)
    qemu_io(str(host_base), "write -P 0x11 0 16M")
    store_base = tmp_path / "offline" / "bases" / "abc.qcow2"
    store_base.parent.mkdir(parents=True)
    shutil.copyfile(host_base, store_base)
    root = tmp_path / "pool" / "desk-root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(host_base), "-F",
                    "qcow2", str(root)], check=True)
    qemu_io(str(root), "write -P 0x22 1M 64k", "write -P 0x33 100M 4k", "write -P 0x44 200M 1M")
    return host_base, store_base, root


def test_the_layer_holds_what_the_desktop_holds_and_the_disk_comes_back_with_the_laptops_work(
        desktop_disk: tuple[Path, Path, Path], tmp_path: Path) -> None:
    host_base, store_base, root = desktop_disk
    key = os.urandom(32)
    layer = tmp_path / "offline" / "layers" / "d1" / "layer.qcow2"  # its folder made too
    layer_from_overlay(root, layer, store_base, key)

    facts = layer_facts(layer)
    assert (facts.encrypted, facts.encrypt_format, facts.cipher_alg) == (True, "luks",
                                                                       "aes-256")
    assert facts.backing_file == "../../bases/abc.qcow2"  # relative: the laptop's cache too
    held = sum(e.length for e in allocated_extents(layer, key) if not e.zero)
    assert held == 64 * 1024 + 4096 + MiB  # the user's writes, nothing of the template
    assert read_guest_bytes(layer, key, 1 * MiB, 64) == b"\x22" * 64
    assert read_guest_bytes(layer, key, 200 * MiB, 64) == b"\x44" * 64
    assert read_guest_bytes(layer, key, 8 * MiB, 64) == b"\x11" * 64  # read through
    assert b"\x44" * 4096 not in layer.read_bytes()  # encrypted at rest

    # The laptop writes; the layer comes back; the desktop's disk is rebuilt from it.
    qemu_io(layer_spec(layer, with_backing=True), "write -P 0x55 150M 8k", key=key)
    root.chmod(0o640)
    overlay_from_layer(layer, key, root, host_base)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(root)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(host_base) and "encrypt" not in info.get(
        "format-specific", {}).get("data", {})
    assert root.stat().st_mode & 0o777 == 0o640
    qemu_io(str(root), "read -P 0x55 150M 8k", "read -P 0x22 1M 64k", "read -P 0x33 100M 4k",
            "read -P 0x11 0 1M")
    assert not list(root.parent.glob(".*partial"))


def test_a_failed_rebuild_or_layer_leaves_what_was_there(
        desktop_disk: tuple[Path, Path, Path], tmp_path: Path) -> None:
    host_base, store_base, root = desktop_disk
    key = os.urandom(32)
    layer = tmp_path / "layer.qcow2"
    layer_from_overlay(root, layer, store_base, key)
    before_root, before_layer = sha256(root), sha256(layer)
    with pytest.raises(OfflineLayerError):
        overlay_from_layer(layer, os.urandom(32), root, host_base)  # another key
    assert sha256(root) == before_root
    damaged = tmp_path / "damaged.qcow2"
    damaged.write_bytes(b"QFI\xfb" + b"\xff" * 4096)  # a qcow2 magic over garbage
    with pytest.raises(OfflineLayerError, match="making the offline layer"):
        layer_from_overlay(damaged, layer, store_base, key)
    assert sha256(layer) == before_layer
    assert not list(tmp_path.rglob(".*partial"))
