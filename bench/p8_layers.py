"""P8: what one master image costs per stateless desktop, and a user layer's rebase onto a
new template version against a full clone of the master, in one run on this host.

* **P8d.** A stateless pool (floating, reverted at logoff) of ``--desktops`` console-flavor
  desktops is made on ``qemu:///system`` from the image the project builds, reverting by
  ``--revert-by`` (a fresh boot, the default, or the factory snapshot), and each is used
  once (a user connects, writes a little, logs off, the desktop is reverted). Then, per
  desktop, the allocation of its own root volume (the qcow2 overlay on the shared master,
  a factory snapshot included if it has one) against the master's allocation.
* **P8.** The master's root filesystem is read into a directory (``qemu-img convert`` to raw,
  ``debugfs rdump``: no mount), a "patched" version is made from it (the files of one
  package rewritten, some ``/etc`` files changed, its dpkg status bumped), and a user layer of
  ``--layer-mib`` MiB is planted on the old one (files in ``/opt`` and a home, an edited
  ``/etc`` file the patch also changes, a new one). The rebase (``rebase_layer``, the code a
  rollout runs) is timed against a full clone of the master on the same host
  (``clone_volume(..., FULL)``, the factory's own full clone).

Lines, then the last one:
    P8d <mean bytes a stateless desktop adds on disk / master image size>   (target <= 0.05)
    P8 <rebase of a desktop's user layer, s / full clone of the master, s>  (target <= 0.5)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pools import tear_down

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.models import CloneMode
from deskpool.domain.pools import PoolSpec, RevertBy
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.drivers.libvirt.driver import LibvirtDriver
from deskpool.images.builder import GuestImage, build_guest_image
from deskpool.images.layer_rebase import create_layer, rebase_layer, record_changes
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.factory import copy_version_to_host
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

POOL = "p8"
MiB = 2**20
PATCHED_PACKAGE = "zstd"  # in every flavor; its files are rewritten by the "patch"


def settle(reconciler: Reconciler, done: object, what: str, timeout_s: float) -> None:
    started = time.monotonic()
    while not done():  # type: ignore[operator]
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"{what} did not happen in {timeout_s:.0f} s")
        report = reconciler.run_pass()
        if report.errors:
            raise SystemExit(f"reconciler: {report.errors}")


def stateless_share(ctx: ServiceContext, desktops: int, revert_by: RevertBy) -> list[float]:
    """Each desktop's own allocation over the master's, after one use."""
    PoolService(ctx).create(PoolSpec(POOL, POOL, spare=desktops, max_size=desktops,
                                     naming_pattern=f"{POOL}-{{n:02}}", revert_by=revert_by))
    EntitlementService(ctx).grant(POOL, "group", "p8-users")
    reconciler = Reconciler(ctx, workers=2, ready_timeout_s=420)

    def ready() -> int:
        return sum(d.state == "ready" for d in DesktopService(ctx).list())

    settle(reconciler, lambda: ready() >= desktops, "the pool filling", 300 + 200 * desktops)
    broker = Broker(ctx, ready_timeout_s=300)
    driver = ctx.driver_for_name("local")
    for n in range(desktops):
        user = Identity(f"p8-user-{n}", "", "local", frozenset({"p8-users"}))
        handed = broker.connect(user, POOL)
        if handed.status != "ready" or handed.desktop_id is None:
            raise SystemExit(f"connect: {handed.message}")
        code, _, err = GuestAgent(driver, handed.desktop_id).exec_capture(
            ["sh", "-c", "head -c 4M /dev/urandom > /root/work.bin && sync"], timeout_s=120)
        if code != 0:
            raise SystemExit(f"guest write: {err}")
        SessionService(ctx).log_off(handed.desktop_id, by=None, reason="bench P8")
        settle(reconciler, lambda: ready() >= desktops, "the revert", 600)
    with ctx.uow(read_only=True) as uow:
        tv = uow.versions.latest(uow.templates.get_by_name(POOL).id)
        base, _ = copy_version_to_host(driver, tv)
    master = driver.volume_info(base).allocation_bytes
    shares = []
    for d in DesktopService(ctx).list():
        own = driver.volume_info(root_volume_name(d.id)).allocation_bytes
        shares.append(own / master)
        print(f"  {d.name}: {own / MiB:.1f} MiB of its own over a {master / MiB:.1f} MiB "
              f"master ({own / master:.3f})", flush=True)
    return shares


def full_clone_s(ctx: ServiceContext) -> float:
    driver = ctx.driver_for_name("local")
    assert isinstance(driver, LibvirtDriver)  # the factory's full clone, on its own
    with ctx.uow(read_only=True) as uow:
        tv = uow.versions.latest(uow.templates.get_by_name(POOL).id)
        base, _ = copy_version_to_host(driver, tv)
    started = time.monotonic()
    driver.clone_volume(base, "p8-full-clone.qcow2", CloneMode.FULL)
    took = time.monotonic() - started
    driver.delete_volume("p8-full-clone.qcow2")
    return took


def read_root(image: GuestImage, work: Path) -> Path:
    raw, root = work / "master.raw", work / "old-root"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.disk), str(raw)],
                   check=True)
    root.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {root}", str(raw)], check=True,
                   capture_output=True)
    raw.unlink()
    return root


def patched_copy(old: Path, work: Path) -> Path:
    """A new version: one package's files rewritten, some /etc changed, its status bumped."""
    new = work / "new-root"
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    listed = (new / f"var/lib/dpkg/info/{PATCHED_PACKAGE}.list").read_text().split()
    for path in listed:
        target = new / path.lstrip("/")
        if target.is_file() and not target.is_symlink():
            target.write_bytes(target.read_bytes() + b"\0patched")
    for path in ("etc/issue", "etc/motd", "etc/deskpool-release"):
        (new / path).write_text(f"patched {path}\n")
    status = new / "var/lib/dpkg/status"
    text = status.read_text()
    head, sep, rest = text.partition(f"Package: {PATCHED_PACKAGE}\n")
    version_line = next(line for line in rest.splitlines() if line.startswith("Version: "))
    status.write_text(head + sep + rest.replace(version_line, version_line + "+patch1", 1))
    return new


def planted_layer(old: Path, work: Path, layer_mib: int) -> Path:
    """A user layer on ``old``: most of it in /opt, some in a home, an /etc file the patch
    changes too, a new /etc file."""
    layer = work / "layer"
    create_layer(layer, "v1")
    upper = layer / "upper"
    (upper / "opt/app").mkdir(parents=True)
    (upper / "home/pat").mkdir(parents=True)
    (upper / "etc").mkdir()
    left, n = layer_mib * MiB, 0
    while left > 0:
        size = min(left, 4 * MiB)
        folder = "opt/app" if n % 5 else "home/pat"
        (upper / folder / f"file-{n:04}.bin").write_bytes(os.urandom(size))
        left, n = left - size, n + 1
    (upper / "etc/issue").write_text("the user's own issue\n")
    (upper / "etc/app.conf").write_text("setting=1\n")
    record_changes(layer, old)
    return layer


def rebase_s(old: Path, new: Path, layer: Path, work: Path) -> float:
    out = work / "rebased"
    started = time.monotonic()
    report = rebase_layer(old, new, layer, out, old_version="v1", new_version="v2")
    took = time.monotonic() - started
    print(f"  rebase: {len(report.kept)} kept, {len(report.dropped)} dropped, "
          f"{len(report.conflicts)} conflict(s), {report.bytes / MiB:.0f} MiB in the new "
          f"layer, {took:.2f} s", flush=True)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--desktops", type=int, default=2)
    parser.add_argument("--layer-mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rebase / clone pairs")
    parser.add_argument("--revert-by", choices=[r.value for r in RevertBy], default="boot",
                        help="how the stateless pool reverts (default: a fresh boot)")
    args = parser.parse_args()
    image = build_guest_image(Settings().image_cache_dir, recipe_for(Flavor.CONSOLE))
    with tempfile.TemporaryDirectory(prefix="p8-", dir="/var/tmp") as scratch:  # nosec B108
        work = Path(scratch)
        storage = work / "pool"
        ctx = ServiceContext(Settings(data_dir=work / "data"))
        try:
            HostService(ctx).add("local", "qemu:///system", storage_dir=storage)
            TemplateService(ctx).publish(POOL, ImageFiles.from_guest_image(image),
                                         recipe_hash=image.recipe_hash, arch="x86_64")
            shares = stateless_share(ctx, args.desktops, RevertBy(args.revert_by))
            old = read_root(image, work)
            new = patched_copy(old, work)
            rebases, clones = [], []
            for n in range(args.rounds):  # interleaved: the machine's noise hits both
                layer_dir = work / f"round-{n}"
                layer_dir.mkdir()
                layer = planted_layer(old, layer_dir, args.layer_mib)
                rebases.append(rebase_s(old, new, layer, layer_dir))
                clones.append(full_clone_s(ctx))
                print(f"  full clone: {clones[-1]:.2f} s", flush=True)
                shutil.rmtree(layer_dir)
        finally:
            tear_down(ctx, POOL, storage)
    print(f"P8d {statistics.mean(shares):.3f}")
    print(f"P8 {statistics.median(rebases) / statistics.median(clones):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
