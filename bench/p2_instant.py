"""P2: time to a ready desktop, instant clone against cold boot, on one host in one run.

Both are measured the same way: from the factory's create call until the desktop is ``ready``
(guest agent answers and the guest carries the database's identity). Cold: a linked clone
booted from its disk. Instant: a restore of the template's saved memory, a NIC swap and the
identity applied through the agent. Runs alternate so machine noise hits both alike.

Last two lines:
    cold <median s> instant <median s>
    P2 <instant-clone ready seconds / cold-boot ready seconds>   (target <= 0.10)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.models import CloneMode
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.images.builder import build_guest_image
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.instant import InstantCloneService
from deskpool.services.templates import ImageFiles, TemplateService


def timed_create(desktops: DesktopService, mode: CloneMode) -> float:
    start = time.perf_counter()
    desktop = desktops.create("bench", clone_mode=mode, pattern=f"p2-{mode.value}-{{n:02}}",
                              ready_timeout_s=300)
    elapsed = time.perf_counter() - start
    desktops.delete(str(desktop.id))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=3, help="desktops of each kind")
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()

    image = build_guest_image(Settings().image_cache_dir)
    with tempfile.TemporaryDirectory(prefix="deskpool-p2-") as tmp:
        ctx = ServiceContext(Settings(data_dir=Path(tmp) / "data"))
        HostService(ctx).add("local", args.uri, storage_dir=Path(tmp) / "pool")
        TemplateService(ctx).publish("bench", ImageFiles.from_guest_image(image))
        start = time.perf_counter()
        InstantCloneService(ctx).capture("bench", host="local")
        print(f"capture of the template's memory state: {time.perf_counter() - start:.1f} s")
        desktops = DesktopService(ctx)
        cold: list[float] = []
        instant: list[float] = []
        try:
            for _ in range(args.n):
                cold.append(timed_create(desktops, CloneMode.LINKED))
                instant.append(timed_create(desktops, CloneMode.INSTANT))
        finally:
            for desktop in desktops.list():
                desktops.delete(str(desktop.id))
            InstantCloneService(ctx).forget("bench", host="local")
            driver = ctx.driver_for_name("local")
            if isinstance(driver, LibvirtDriver):
                driver.forget_storage_pool()
            ctx.close()
    print("cold:    " + " ".join(f"{t:.2f}" for t in cold))
    print("instant: " + " ".join(f"{t:.2f}" for t in instant))
    cold_s, instant_s = statistics.median(cold), statistics.median(instant)
    print(f"cold {cold_s:.2f} instant {instant_s:.2f}")
    print(f"P2 {instant_s / cold_s:.3f}")


if __name__ == "__main__":
    main()
