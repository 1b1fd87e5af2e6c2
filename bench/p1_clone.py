"""P1: linked clones against full clones of one template version, side by side in one run.

Creates N linked and N full clones of the project's own guest image on ``qemu:///system``
through the libvirt driver (volume + VM definition: the clone step of the desktop factory),
interleaved so machine noise hits both kinds alike, then removes them.

Last two lines:
    disk <linked bytes / full bytes>   (allocated on disk, summed over the N clones)
    P1 <linked seconds / full seconds> (target <= 0.01)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, VmMetadata, VmSpec
from deskpool.drivers.base import root_volume_name
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import build_guest_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5, help="clones of each kind")
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()

    image = build_guest_image(Settings().image_cache_dir)
    with tempfile.TemporaryDirectory(prefix="deskpool-p1-") as tmp:
        driver = LibvirtDriver(args.uri, storage_dir=Path(tmp) / "pool")
        driver.import_volume("base.qcow2", image.disk, image.disk_sha256)
        seconds = {CloneMode.LINKED: 0.0, CloneMode.FULL: 0.0}
        allocated = {CloneMode.LINKED: 0, CloneMode.FULL: 0}
        made: list[uuid.UUID] = []
        try:
            for i in range(args.n):
                for mode in (CloneMode.LINKED, CloneMode.FULL):
                    vm_id = uuid.uuid4()
                    spec = VmSpec(vm_id=vm_id, name=f"p1-{mode.value}-{i}-{vm_id.hex[:6]}",
                                  base_volume="base.qcow2", clone_mode=mode, mac=new_mac(),
                                  metadata=VmMetadata(vm_id, f"p1-{i}"))
                    start = time.perf_counter()
                    driver.create_vm(spec)
                    seconds[mode] += time.perf_counter() - start
                    made.append(vm_id)
                    root = Path(driver.volume_info(root_volume_name(vm_id)).path)
                    allocated[mode] += root.stat().st_blocks * 512
        finally:
            for vm_id in made:
                driver.delete_vm(vm_id)
            driver.delete_volume("base.qcow2")
            driver.forget_storage_pool()
            driver.close()
    n = args.n
    print(f"base image {image.disk.stat().st_size / 2**20:.0f} MiB, {n} clones of each kind")
    print(f"linked: {seconds[CloneMode.LINKED] / n * 1000:.1f} ms/clone, "
          f"{allocated[CloneMode.LINKED] / n / 2**10:.0f} KiB/clone on disk")
    print(f"full:   {seconds[CloneMode.FULL] / n * 1000:.1f} ms/clone, "
          f"{allocated[CloneMode.FULL] / n / 2**20:.0f} MiB/clone on disk")
    print(f"disk {allocated[CloneMode.LINKED] / allocated[CloneMode.FULL]:.4f}")
    print(f"P1 {seconds[CloneMode.LINKED] / seconds[CloneMode.FULL]:.4f}")


if __name__ == "__main__":
    main()
