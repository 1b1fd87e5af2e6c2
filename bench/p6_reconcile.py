"""P6: reconcile pass time at 10,000 desktops against 1,000, fake driver, one run.

Each size gets its own fresh database (SQLite, the embedded default) and fake host, filled
directly with ready, running pool desktops at their wanted size (setting up 10,000 through
the factory would measure the factory, not the pass). Then steady-state passes are timed: the
pass still syncs every VM's power state, plans every pool and looks at every desktop for an
action, which is the work that grows with the fleet.

The fake hypervisor runs in its own process by default (``--hypervisor remote``, reached over
``fake+tcp://``), as libvirtd does for a real broker: with ``in-process`` its 10,000 simulated
VMs live in the broker's own heap, and Python's garbage collector scans them on every full
collection, a cost no real deployment has. Both modes can be measured; the figure is the
mode asked for.

Last two lines:
    times <seconds at 1,000> <seconds at 10,000>
    P6 <pass time at 10,000 / pass time at 1,000>   (linear is 10; target <= 11)
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.identity import DesktopIdentity
from deskpool.domain.models import CloneMode, PowerState, VmMetadata, VmSpec
from deskpool.domain.pools import PoolSpec
from deskpool.domain.states import DesktopState
from deskpool.drivers.fake.remote import AUTHKEY_ENV
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

POOL_SIZE = 500  # desktops per pool: 2 pools at 1,000, 20 at 10,000


def populate(ctx: ServiceContext, total: int, disk: Path, base_uri: str) -> None:
    uri = f"{base_uri}p6-{total}"
    HostService(ctx).add("h1", uri)
    driver = open_driver(uri)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    driver.import_volume("base", disk)
    with ctx.uow() as uow:
        host = uow.hosts.get_by_name("h1")
        version = uow.versions.latest(uow.templates.get_by_name("golden").id)
        host_id, version_id = host.id, version.id
    for p in range(total // POOL_SIZE):
        PoolService(ctx).create(PoolSpec(
            name=f"pool{p}", template="golden", min_size=POOL_SIZE, max_size=POOL_SIZE,
            spare=0, naming_pattern=f"p{p}-{{n:04}}"))
    taken_macs: set[str] = set()
    with ctx.uow() as uow:
        for pool in uow.pools.list():
            p = int(pool.name.removeprefix("pool"))
            for n in range(1, POOL_SIZE + 1):
                row = DesktopFactory.new_row(name=f"p{p}-{n:04}", version_id=version_id,
                                             host_id=host_id, clone_mode=CloneMode.LINKED,
                                             taken_macs=taken_macs, pool_id=pool.id)
                row.state = DesktopState.READY.value
                row.power_state = PowerState.RUNNING
                uow.session.add(row)
                identity = DesktopIdentity(row.id, row.name, row.mac, row.machine_id)
                driver.create_vm(VmSpec(vm_id=row.id, name=row.name, base_volume="base",
                                        clone_mode=CloneMode.LINKED, mac=row.mac,
                                        metadata=VmMetadata(row.id, row.name),
                                        identity_text=identity.to_guest_text()))
                driver.start_vm(row.id)
        uow.session.commit()


def measure(total: int, disk: Path, passes: int, base_uri: str) -> float:
    with tempfile.TemporaryDirectory(prefix="deskpool-p6-") as tmp:
        ctx = ServiceContext(Settings(data_dir=Path(tmp)))
        populate(ctx, total, disk, base_uri)
        reconciler = Reconciler(ctx)
        first = reconciler.run_pass()  # warm caches; must find nothing to do
        assert first.created == 0 and not first.errors, first
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            report = reconciler.run_pass()
            times.append(time.perf_counter() - start)
            assert report.created == 0 and report.power_changes == 0, report
        ctx.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--hypervisor", choices=("remote", "in-process"), default="remote")
    args = parser.parse_args()
    forget_fake_hosts()
    server = None
    base_uri = "fake://"
    if args.hypervisor == "remote":
        os.environ.setdefault(AUTHKEY_ENV, secrets.token_hex(16))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "deskpool.drivers.fake.remote",
                                   "--port", str(port)])
        base_uri = f"fake+tcp://127.0.0.1:{port}/"
        time.sleep(1.0)  # the server binds its port
    try:
        with tempfile.TemporaryDirectory() as tmp:
            disk = Path(tmp) / "golden.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"],
                           check=True)
            small = measure(1_000, disk, args.passes, base_uri)
            large = measure(10_000, disk, args.passes, base_uri)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    print(f"hypervisor {args.hypervisor}")
    print(f"times {small:.3f} {large:.3f}")
    print(f"P6 {large / small:.2f}")


if __name__ == "__main__":
    main()
