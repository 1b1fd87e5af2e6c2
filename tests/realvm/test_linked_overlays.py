"""Linked clones written from a prototype overlay (``drivers/libvirt/overlays.py``), checked
through ``qemu-img`` and the file system rather than through deskpool. That such a clone boots
the project's image is shown by ``test_real_desktops.py``, whose desktops are linked clones."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.errors import Conflict, DriverError, NotFound
from deskpool.domain.models import CloneMode, VolumeInfo
from deskpool.drivers.libvirt import LibvirtDriver, overlays
from deskpool.drivers.libvirt.overlays import OverlayWriter, prototype_volume_name
from tests.conftest import qemu_system_unreachable_reason, skip_or_fail_without_real_vms
from tests.realvm.conftest import remove_pool_of

pytestmark = pytest.mark.realvm
BASE = "overlay-base.qcow2"


def qcow2(path: Path, size: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def qemu_img_info(path: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                         check=True, capture_output=True, text=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


def linked_clone(driver: LibvirtDriver, name: str) -> VolumeInfo:
    driver.clone_volume(BASE, name, CloneMode.LINKED)
    return driver.volume_info(name)


@pytest.fixture(params=["local-file", "upload-stream"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LibvirtDriver]:
    """Both ways of writing an overlay: into the pool's directory (this machine's system
    daemon, as root) and over libvirt's upload stream (how remote hosts get theirs)."""
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    storage = tmp_path / "pool"
    drv = LibvirtDriver("qemu:///system", storage_dir=storage)
    if request.param == "upload-stream":
        drv._overlays.local_dir = None
    else:
        assert drv._overlays.local_dir == storage
    drv.import_volume(BASE, qcow2(tmp_path / "base.qcow2", "96M"))
    try:
        yield drv
    finally:
        for name in drv.list_volumes():
            drv.delete_volume(name)
        drv.close()
        remove_pool_of(storage)


def test_a_linked_clone_is_a_sound_overlay_on_the_base(driver: LibvirtDriver) -> None:
    base = driver.volume_info(BASE)
    first, second = (linked_clone(driver, name) for name in ("one.qcow2", "two.qcow2"))

    for clone in (first, second):
        info = qemu_img_info(clone.path)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == base.capacity_bytes == 96 * 2**20
        assert info["backing-filename"] == base.path
        assert info["backing-filename-format"] == "qcow2"
        check = subprocess.run(["qemu-img", "check", "-U", clone.path],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # libvirt, too, sees the overlay it did not write itself
        assert (clone.capacity_bytes, clone.backing_volume_path) == (base.capacity_bytes, base.path)
    # Two files, not one: a write to one clone cannot show in the other.
    assert Path(first.path).stat().st_ino != Path(second.path).stat().st_ino
    assert Path(first.path).read_bytes() == Path(second.path).read_bytes()
    assert not any(name.endswith(".overlay-prototype") for name in driver.list_volumes())


def test_a_write_to_a_linked_clone_stays_in_that_clone(driver: LibvirtDriver) -> None:
    base = driver.volume_info(BASE)
    first, second = (linked_clone(driver, name) for name in ("one.qcow2", "two.qcow2"))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", first.path],
                   check=True, capture_output=True)

    def first_byte(path: str) -> bytes:
        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 0 1", path],
                             check=True, capture_output=True, text=True).stdout
        return bytes.fromhex(out.split(":", 1)[1].split()[0])

    assert first_byte(first.path) == b"\xab"
    assert first_byte(second.path) == b"\x00"
    assert first_byte(base.path) == b"\x00"


def test_a_stale_prototype_from_a_crash_is_replaced(
    driver: LibvirtDriver, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"not an overlay" * 100)
    driver.import_volume(prototype_volume_name(BASE), garbage)

    clone = linked_clone(driver, "one.qcow2")

    assert qemu_img_info(clone.path)["backing-filename"] == driver.volume_info(BASE).path
    assert prototype_volume_name(BASE) not in driver.list_volumes()


def test_a_failed_write_leaves_no_volume(
    driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.clone_volume(BASE, "warm.qcow2", CloneMode.LINKED)  # the prototype is made

    def broken_upload(self: OverlayWriter, vol: object, data: bytes) -> None:
        raise DriverError("the stream broke")

    def broken_write(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OverlayWriter, "_upload", broken_upload)
    monkeypatch.setattr(overlays.os, "write", broken_write)
    with pytest.raises((DriverError, OSError), match=r"the stream broke|No space left"):
        driver.clone_volume(BASE, "one.qcow2", CloneMode.LINKED)
    assert sorted(driver.list_volumes()) == [BASE, "warm.qcow2"]
    assert not (driver.storage_dir / "one.qcow2").exists()


def test_a_reimported_base_gets_overlays_of_its_own_size(
    driver: LibvirtDriver, tmp_path: Path
) -> None:
    driver.clone_volume(BASE, "one.qcow2", CloneMode.LINKED)  # caches the 96 MiB prototype
    driver.delete_volume("one.qcow2")
    driver.delete_volume(BASE)
    driver.import_volume(BASE, qcow2(tmp_path / "bigger.qcow2", "160M"))

    clone = linked_clone(driver, "two.qcow2")

    assert qemu_img_info(clone.path)["virtual-size"] == 160 * 2**20


def test_clone_volume_refuses_a_missing_base_and_a_taken_name(driver: LibvirtDriver) -> None:
    driver.clone_volume(BASE, "one.qcow2", CloneMode.LINKED)
    with pytest.raises(NotFound, match=r"no-such\.qcow2"):
        driver.clone_volume("no-such.qcow2", "two.qcow2", CloneMode.LINKED)
    with pytest.raises(Conflict, match=r"one\.qcow2"):
        driver.clone_volume(BASE, "one.qcow2", CloneMode.FULL)
    assert sorted(driver.list_volumes()) == sorted([BASE, "one.qcow2"])
