"""P9: live migration of console-flavor desktops between two libvirt hosts on this machine
(``qemu:///system`` and a second, independent daemon from ``tests/libvirt_hosts.py``), in one
run: the bytes that cross against the overlay's, and the guest's pause against a cold boot.

For each of ``-n`` desktops: it is created on the first host and timed from the create call to
``ready`` (a cold boot: guest agent answers, identity confirmed); the guest then writes
``--write-mib`` MiB of new data to its disk (so its overlay holds something to copy) and runs
a timestamp writer (``date +%s.%N`` into a tmpfs file, every 10 ms); the desktop is moved
with ``MigrationService.migrate`` to the second host, and afterwards the largest gap between
two consecutive timestamps (the writer's own period taken off) is the guest's downtime, as
the guest saw it. The overlay's size is its allocation on the first host just before the
move; the bytes that crossed for the disk are libvirt's ``disk_processed`` job statistic.

Lines, then the last one:
    P9b <disk bytes moved / overlay bytes>                             (target <= 1.2)
    P9 <median guest downtime in the move / median cold boot to ready>  (target <= 0.02)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.libvirt_hosts

from deskpool.config import Settings
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.drivers.libvirt import forget_storage_pool
from deskpool.images.builder import build_guest_image
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.migration import MigrationService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.libvirt_hosts import SecondLibvirtHost

PERIOD_S = 0.01
WRITER = ("nohup setsid sh -c 'while :; do date +%s.%N >> /run/ts; sleep 0.01; done' "
          ">/dev/null 2>&1 &")


def largest_gap(text: str) -> float:
    stamps = [float(line) for line in text.split() if line.strip()]
    if len(stamps) < 2:
        raise SystemExit("the guest's timestamp writer wrote fewer than two lines")
    return max(b - a for a, b in itertools.pairwise(stamps)) - PERIOD_S


def run(agent: GuestAgent, script: str) -> str:
    code, out, err = agent.exec_capture(["sh", "-c", script], timeout_s=300)
    if code != 0:
        raise SystemExit(f"guest command failed ({code}): {script}: {err}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="desktops moved")
    parser.add_argument("--write-mib", type=int, default=32,
                        help="MiB each guest writes before its move")
    args = parser.parse_args()
    if not 1 <= args.n <= 20 or not 1 <= args.write_mib <= 1024:
        parser.error("-n must be 1-20 and --write-mib 1-1024")
    image = build_guest_image(Settings().image_cache_dir)
    boots: list[float] = []
    downtimes: list[float] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="deskpool-p9-", dir="/var/tmp") as tmp, \
            SecondLibvirtHost() as second:
        root = Path(tmp)
        ctx = ServiceContext(Settings(data_dir=root / "data"))
        try:
            HostService(ctx).add("a-local", "qemu:///system", storage_dir=root / "pool")
            HostService(ctx).add("b-second", second.uri, storage_dir=second.storage_dir)
            TemplateService(ctx).publish("bench", ImageFiles.from_guest_image(image),
                                         recipe_hash=image.recipe_hash, arch="x86_64")
            desktops, moves = DesktopService(ctx), MigrationService(ctx)
            for _ in range(args.n):
                started = time.perf_counter()
                d = desktops.create("bench", host="a-local", pattern="p9-{n:02}",
                                    ready_timeout_s=600)
                boots.append(time.perf_counter() - started)
                agent = GuestAgent(ctx.driver_for_name("a-local"), d.id, command_timeout_s=60)
                run(agent, f"head -c {args.write_mib}M /dev/urandom > /root/blob && sync")
                run(agent, WRITER)
                time.sleep(3)
                overlay = ctx.driver_for_name("a-local").volume_info(
                    root_volume_name(d.id)).allocation_bytes
                moved = moves.migrate(d.name, target="b-second", reason="bench P9")
                landed = ctx.driver_for_name("b-second").volume_info(
                    root_volume_name(d.id)).allocation_bytes
                time.sleep(3)
                after = GuestAgent(ctx.driver_for_name("b-second"), d.id, command_timeout_s=60)
                gap = largest_gap(run(after, "cat /run/ts"))
                downtimes.append(gap)
                ratios.append(moved.stats.disk_bytes / overlay)
                print(f"{d.name}: cold boot to ready {boots[-1]:.1f} s; moved in "
                      f"{moved.stats.seconds:.1f} s, {moved.stats.memory_bytes / 2**20:.0f} MiB "
                      f"of memory and {moved.stats.disk_bytes / 2**20:.1f} MiB of disk for an "
                      f"overlay of {overlay / 2**20:.1f} MiB ({landed / 2**20:.1f} MiB on the "
                      f"target); libvirt's downtime "
                      f"{moved.stats.downtime_ms} ms, the guest's largest gap {gap * 1000:.0f} ms",
                      flush=True)
                desktops.delete(d.name)
        finally:
            for d in DesktopService(ctx).list():
                DesktopService(ctx).delete(d.name)
            ctx.close()
            forget_storage_pool(root / "pool")
    boot, down = statistics.median(boots), statistics.median(downtimes)
    print(f"cold boot median {boot:.1f} s (max {max(boots):.1f}); guest downtime median "
          f"{down * 1000:.0f} ms (max {max(downtimes) * 1000:.0f})")
    print(f"P9b {max(ratios):.2f}")
    print(f"P9 {down / boot:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
