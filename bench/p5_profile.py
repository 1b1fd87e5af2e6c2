"""P5: a logon with a 1 GiB roaming profile against one with an empty profile, the bytes a
logoff writes back against the bytes the user changed, and a copy-based profile's copy-in,
in one run on this host's ``qemu:///system``.

A pool of two desktop-flavor desktops with ``roaming_profiles`` (the image the project builds)
is made by the reconciler. Two users: ``empty`` has a fresh profile, ``big`` a profile of
``--profile-mib`` MiB of incompressible files (made on the host with ``mkfs.ext4 -d``, no
mount). Two rounds, the desktops swapped between them so that neither user always gets the
same one; each round both users press Connect one after the other (``Broker.connect``, timed
until their Xfce session runs) and are logged off, and the reconciler ends their profile
sessions (commit) and reverts the desktops.

In round 1, ``big``'s session changes ~10 MB through the guest's own filesystem: ``--writes``
scattered 4 KiB writes inside an existing 64 MiB file plus ``--new-mib`` MiB of new files.
What its logoff wrote back is the committed layer's allocated size.

The copy-based alternative is measured with ``rsync -a`` of the same file tree into an empty
directory on this host's disk: a lower bound of copying it into a fresh desktop, which would
also cross a network and a guest's disk.

Lines, then the last one:
    P5b <bytes written back / bytes changed>            (target <= 1.3)
    P5r <1 GiB profile's step of the logon / rsync copy-in of that profile>   (target <= 0.1)
    P5 <logon with the 1 GiB profile / logon with the empty profile>           (target <= 1.1)

The profile's step of the logon runs from the session layer's row (written just before its
file is made and hot-plugged) to ext4 mounting the disk in the guest (its kernel log). Whole-logon
seconds are printed too.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_pools import tear_down

from deskpool.broker.desktop_session import SessionStarter
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.profile_logon import ProfileLogon
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.profiles import LayerState
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import build_guest_image
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.profiles import ProfileService
from deskpool.services.templates import ImageFiles, TemplateService

POOL, GROUP = "p5", "p5-users"
MiB = 2**20
EMPTY = Identity(name="empty", display_name="Empty", source="local",
                 groups=frozenset({GROUP}))
BIG = Identity(name="big", display_name="Big", source="local", groups=frozenset({GROUP}))


def fill_tree(root: Path, total_mib: int, rng: random.Random) -> None:
    """``total_mib`` MiB of random files (4 MiB each, 16 to a directory) plus work.db."""
    (root / "Documents").mkdir(parents=True)
    with (root / "work.db").open("wb") as handle:
        handle.write(rng.randbytes(64 * MiB))
    for n in range(max(0, total_mib - 64) // 4):
        folder = root / "Documents" / f"folder{n // 16:03}"
        folder.mkdir(exist_ok=True)
        (folder / f"file{n:04}.bin").write_bytes(rng.randbytes(4 * MiB))


def run_in_guest(agent: GuestAgent, script: str, *, user: str | None = None,
                 timeout_s: float = 600) -> str:
    argv = ["/bin/sh", "-c", script]
    if user is not None:
        argv = ["/usr/sbin/runuser", "-u", user, "--", "/bin/sh", "-c", script]
    code, out, err = agent.exec_capture(argv, timeout_s=timeout_s)
    if code != 0:
        raise SystemExit(f"in the guest, {script[:80]!r} failed ({code}): {err.strip()}")
    return out


def mounted_after(agent: GuestAgent, since: datetime) -> float | None:
    """Seconds from ``since`` to the guest's ext4 mounting a filesystem (its kernel log)."""
    for line in run_in_guest(agent, "dmesg --time-format iso").splitlines():
        stamp, _, text = line.partition(" ")
        try:
            at = datetime.fromisoformat(stamp.replace(",", ".")).astimezone(UTC)
        except ValueError:
            continue
        if at >= since and "EXT4-fs" in text and "mounted filesystem" in text:
            return (at - since).total_seconds()
    return None


class TimedProfileLogon(ProfileLogon):
    """The broker's profile step, timed: the user's profile made if need be, a session
    layer created and hot-plugged into the desktop."""

    last_s = 0.0

    def attach(self, *args: Any, **kwargs: Any) -> str:
        started = time.monotonic()
        serial = super().attach(*args, **kwargs)
        self.last_s = time.monotonic() - started
        return serial


class Bench:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.reconciler = Reconciler(ctx, workers=2, ready_timeout_s=300)
        self.profiles = TimedProfileLogon(ctx)
        self.broker = Broker(ctx, ready_timeout_s=300, profiles=self.profiles)

    def fill(self) -> None:
        started = time.monotonic()
        while sum(d.state == "ready" for d in DesktopService(self.ctx).list()) < 2:
            if time.monotonic() - started > 900:
                raise SystemExit("the pool did not fill in 15 minutes")
            report = self.reconciler.run_pass()
            if report.errors:
                raise SystemExit(f"reconciler: {report.errors}")

    def agent(self, desktop: str) -> GuestAgent:
        (found,) = [d for d in DesktopService(self.ctx).list() if d.name == desktop]
        return GuestAgent(self.ctx.driver_for_name("local"), found.id, command_timeout_s=60)

    def logon(self, who: Identity) -> tuple[str, float, float]:
        """(desktop, whole logon s, the profile's step s)."""
        started = time.monotonic()
        handover = self.broker.connect(who, POOL)
        took = time.monotonic() - started
        if handover.status != "ready" or handover.desktop is None:
            raise SystemExit(f"{who.name}: {handover.status}: {handover.message}")
        with self.ctx.uow(read_only=True) as uow:
            (layer,) = [la for la in uow.profiles.layers_in_state(LayerState.SESSION)
                        if la.user == who.name]
        assert layer.created_at is not None
        guest = mounted_after(self.agent(handover.desktop),
                              layer.created_at.replace(tzinfo=UTC)) or 0.0
        # The layer's row is written just before its file is made and plugged in, so the
        # guest's mount, counted from it, closes the whole step.
        step = max(guest, self.profiles.last_s)
        print(f"  {who.name:>5} -> {handover.desktop}: logon {took:5.1f} s, profile step "
              f"{step:4.2f} s (attach {self.profiles.last_s:.2f} s, mounted in the guest "
              f"{guest:.2f} s after the layer's row; phases {handover.phases_ms})", flush=True)
        return handover.desktop, took, step

    def log_off_all(self) -> None:
        held = [d for d in DesktopService(self.ctx).list()
                if d.state in ("reserved", "in_use", "idle")]
        for d in held:
            SessionService(self.ctx).log_off(d.id, by=None, reason="the bench logs off")
        started = time.monotonic()
        while any(d.state != "ready" for d in DesktopService(self.ctx).list()):
            if time.monotonic() - started > 900:
                raise SystemExit("the desktops did not come back in 15 minutes")
            report = self.reconciler.run_pass()
            if report.errors:
                raise SystemExit(f"reconciler: {report.errors}")


def changes(args: argparse.Namespace, rng: random.Random) -> tuple[str, int]:
    """A shell script of scattered 4 KiB writes into work.db plus new files, and the
    bytes it changes."""
    offsets = rng.sample(range(64 * MiB // 4096), args.writes)
    writes = " ".join(str(o) for o in offsets)
    script = (f"for o in {writes}; do head -c 4096 /dev/urandom | dd of=$HOME/work.db bs=4096 "
              "seek=$o conv=notrunc status=none; done; mkdir -p $HOME/new; "
              f"for n in $(seq 1 {args.new_mib}); do head -c {MiB} /dev/urandom "
              "> $HOME/new/$n.bin; done; sync")
    return script, args.writes * 4096 + args.new_mib * MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile-mib", type=int, default=1024)
    parser.add_argument("--writes", type=int, default=512, help="scattered 4 KiB writes")
    parser.add_argument("--new-mib", type=int, default=8, help="MiB of new files")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if not 128 <= args.profile_mib <= 8192:
        parser.error("--profile-mib must be between 128 and 8192")
    rng = random.Random(args.seed)
    logons: dict[str, list[float]] = {EMPTY.name: [], BIG.name: []}
    steps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="deskpool-p5-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        ctx = ServiceContext(Settings(data_dir=root / "data"))
        try:
            HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
            image = build_guest_image(Settings().image_cache_dir, recipe_for(Flavor.DESKTOP))
            TemplateService(ctx).publish(POOL, ImageFiles.from_guest_image(image),
                                         recipe_hash=image.recipe_hash,
                                         memory_mib=image.memory_mib, arch="x86_64")
            PoolService(ctx).create(PoolSpec(POOL, POOL, min_size=2, spare=2, max_size=2,
                                             naming_pattern=f"{POOL}-{{n:02}}",
                                             roaming_profiles=True,
                                             session_start_timeout_s=600))
            EntitlementService(ctx).grant(POOL, "group", GROUP)
            # The big profile, made before its first logon, owned by the uid deskpool gives.
            tree = root / "tree"
            fill_tree(tree, args.profile_mib, rng)
            _account, uid = SessionStarter(ctx).account_for(BIG)
            with ctx.uow(read_only=True) as uow:
                gid = uow.linux_accounts.gid_of(BIG.name) or uid
            subprocess.run(["chown", "-R", f"{uid}:{gid}", str(tree)], check=True)
            made = time.monotonic()
            ProfileService(ctx, ctx.settings.resolved_profile_dir, skeleton=tree).ensure_profile(
                BIG.name, owner=(uid, gid), quota_bytes=2 * args.profile_mib * MiB)
            print(f"{args.profile_mib} MiB profile made in {time.monotonic() - made:.0f} s",
                  flush=True)
            copy_in = root / "copy-in"
            subprocess.run(["sync"], check=True)
            started = time.monotonic()
            subprocess.run(["rsync", "-a", f"{tree}/", f"{copy_in}/"], check=True)
            subprocess.run(["sync"], check=True)
            rsync_s = time.monotonic() - started
            shutil.rmtree(copy_in)
            print(f"rsync copy-in of the {args.profile_mib} MiB tree: {rsync_s:.1f} s",
                  flush=True)

            bench = Bench(ctx)
            bench.fill()
            script, changed = changes(args, rng)
            written_back = 0
            for round_no, order in ((1, (EMPTY, BIG)), (2, (BIG, EMPTY))):
                print(f"round {round_no}:", flush=True)
                for who in order:
                    desktop, took, step = bench.logon(who)
                    logons[who.name].append(took)
                    if who is BIG:
                        steps.append(step)
                        if round_no == 1:
                            account, _uid = SessionStarter(ctx).account_for(BIG)
                            run_in_guest(bench.agent(desktop), script, user=account)
                bench.log_off_all()
                if round_no == 1:
                    view = ProfileService(ctx, ctx.settings.resolved_profile_dir).describe(
                        BIG.name)
                    written_back = view.last_writeback_bytes
                    print(f"  big's logoff wrote back {written_back} bytes for {changed} "
                          f"changed (generation {view.generation})", flush=True)
        finally:
            tear_down(ctx, POOL, root / "pool")
    empty, big = statistics.mean(logons[EMPTY.name]), statistics.mean(logons[BIG.name])
    step = statistics.mean(steps)
    print(f"logon, empty profile: {logons[EMPTY.name]} s; {args.profile_mib} MiB profile: "
          f"{logons[BIG.name]} s; whole logon / rsync copy-in {big / rsync_s:.2f}")
    print(f"P5b {written_back / changed:.2f}")
    print(f"P5r {step / rsync_s:.2f}")
    print(f"P5 {big / empty:.2f}")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the profile's files are given the user's uid")
    sys.exit(main())
