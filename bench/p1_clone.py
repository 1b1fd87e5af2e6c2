"""P1: linked clones against full clones of one template version, side by side in one run.

On ``qemu:///system``, through the libvirt driver, with the project's own guest image as the
template version, interleaved so machine noise hits both kinds alike:

* the clone itself, ``LibvirtDriver.clone_volume``: a qcow2 overlay on the version's image
  (linked) or an independent copy of it (full). This is P1.
* the whole ``create_vm`` (the clone, then the VM definition, which costs the same for both
  kinds), printed as its own ratio so the definition's share is in plain sight.

One clone of each kind is made first, untimed in the totals but printed: the first linked clone
on a base has the host make the overlay prototype (see ``drivers/libvirt/overlays.py``), once
per base volume and broker process.

Last two lines:
    disk <linked bytes / full bytes>   (allocated on disk, summed over the N clones)
    P1 <linked seconds / full seconds> (target <= 0.01)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, VmMetadata, VmSpec
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import build_guest_image

BASE = "base.qcow2"
KINDS = (CloneMode.LINKED, CloneMode.FULL)


def settle() -> None:
    """Each sample starts on a quiet disk: a full clone leaves hundreds of MiB for the kernel to
    write back, which would otherwise land on whichever sample comes next."""
    os.sync()


def timed_clone(driver: LibvirtDriver, name: str, mode: CloneMode) -> tuple[float, int]:
    """Seconds to clone, and bytes the clone allocates on disk (read from the file system)."""
    settle()
    start = time.perf_counter()
    driver.clone_volume(BASE, name, mode)
    seconds = time.perf_counter() - start
    return seconds, Path(driver.volume_info(name).path).stat().st_blocks * 512


def timed_create_vm(driver: LibvirtDriver, mode: CloneMode, i: int) -> tuple[float, uuid.UUID]:
    vm_id = uuid.uuid4()
    spec = VmSpec(vm_id=vm_id, name=f"p1-{mode.value}-{i}-{vm_id.hex[:6]}", base_volume=BASE,
                  clone_mode=mode, mac=new_mac(), metadata=VmMetadata(vm_id, f"p1-{i}"))
    settle()
    start = time.perf_counter()
    driver.create_vm(spec)
    return time.perf_counter() - start, vm_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10, help="clones of each kind")
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()
    n = args.n

    image = build_guest_image(Settings().image_cache_dir)
    clone_s = dict.fromkeys(KINDS, 0.0)
    create_s = dict.fromkeys(KINDS, 0.0)
    allocated = dict.fromkeys(KINDS, 0)
    with tempfile.TemporaryDirectory(prefix="deskpool-p1-") as tmp:
        driver = LibvirtDriver(args.uri, storage_dir=Path(tmp) / "pool")
        driver.import_volume(BASE, image.disk, image.disk_sha256)
        vms: list[uuid.UUID] = []
        try:
            warm_up = {mode: timed_clone(driver, f"warm-{mode.value}.qcow2", mode)[0]
                       for mode in KINDS}
            for i in range(n):
                for mode in KINDS:
                    seconds, size = timed_clone(driver, f"p1-{mode.value}-{i}.qcow2", mode)
                    clone_s[mode] += seconds
                    allocated[mode] += size
                    seconds, vm_id = timed_create_vm(driver, mode, i)
                    create_s[mode] += seconds
                    vms.append(vm_id)
        finally:
            for vm_id in vms:
                driver.delete_vm(vm_id)
            for name in driver.list_volumes():
                driver.delete_volume(name)
            driver.forget_storage_pool()
            driver.close()

    def ms(total: float) -> str:
        return f"{total / n * 1000:.1f} ms"

    linked, full = CloneMode.LINKED, CloneMode.FULL
    print(f"template version: {image.disk.stat().st_size / 2**20:.0f} MiB qcow2 on {args.uri}; "
          f"{n} clones of each kind")
    print(f"first clone (untimed above; the linked one makes the base's overlay prototype): "
          f"linked {warm_up[linked] * 1000:.1f} ms, full {warm_up[full] * 1000:.1f} ms")
    print(f"create_vm (clone + VM definition): linked {ms(create_s[linked])}, "
          f"full {ms(create_s[full])}, linked/full {create_s[linked] / create_s[full]:.4f}")
    print(f"clone: linked {ms(clone_s[linked])}, {allocated[linked] / n / 2**10:.0f} KiB on disk; "
          f"full {ms(clone_s[full])}, {allocated[full] / n / 2**20:.0f} MiB on disk")
    print(f"disk {allocated[linked] / allocated[full]:.4f}")
    print(f"P1 {clone_s[linked] / clone_s[full]:.4f}")


if __name__ == "__main__":
    main()
