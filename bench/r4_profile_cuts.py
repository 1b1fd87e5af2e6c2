"""R4: cut a roaming profile's logoff write-back at random moments and check that the user's
profile is afterwards exactly the old generation or exactly the new one, never anything else
(issue 13).

No guest VM is booted. One user's profile (a 64 MiB ext4 home made by deskpool) alternates
between two generations A and B that differ in a few hundred scattered blocks
(``r4_profile_images``). Each cut is one session on a fake desktop whose hypervisor is a
shared fake process, so it outlives a killed broker as libvirtd does:

1. ``ProfileService.start_session`` makes the session overlay on the committed generation
   and plugs it in;
2. the "guest" writes the other generation's blocks into the overlay (``qemu-io``, random
   order, spread over ``--spread-ms``): the logoff write-back;
3. the broker's logoff runs in a process of its own (``r4_cut_processes broker``);
4. a new process runs the crash recovery (``r4_cut_processes recover``);
5. the committed chain is flattened (``qemu-img convert``), checked with ``e2fsck -fn`` and
   its files compared with A's and B's (``debugfs rdump``, sha256 of every file).

The cut, chosen at random per iteration (seeded RNG, the seed printed):

* ``qemu``: the writer is SIGKILLed at a random moment of the write-back (a QEMU killed
  mid-way; a moment after it finished is an uncut logoff). Then, at random: the desktop
  stays down and no logoff runs (the recovery alone finds the layer); or the logoff finds
  a guest that does not answer ``session-hook end`` and, as ``ProfileDesktops.close``
  does, powers it off and sets the layer aside; or the desktop was started again without
  the disk and its guest answers at once ("no profile"), so ``end_session`` runs;
* ``broker``: the write-back finishes and the broker is SIGKILLed at a random moment of
  ``end_session`` (before, during or after the detach, the check, the checksum, the
  compare-and-swap commit).

* ``copy``: a copy of the user's chain to a second host (``ProfileCopies.bring_chain``, as
  a logon there does) is SIGKILLed at a random moment: host A holds the chain, host B none
  of it. After the recovery no record may claim B holds a layer whose bytes there are not
  the layer's (sha256 read back from B), no partial volume or copy record may be left, the
  profile must still be exactly the old generation, and copying again must complete.

Every ``--flatten-every`` cuts the profile is flattened and swept (the reconciler's
maintenance), so the chain stays short and that path meets the cuts' leftovers too.

Last line: ``R4 <profiles not exactly old-or-new>`` (must be 0). A profile counts there if
its files are neither A's nor B's, if ``e2fsck -fn`` or the recorded sha256 of its top
layer finds fault, if it is "new" though the write-back was cut, or if its generation
number does not match what it holds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import r4_profile_images as images

from deskpool.config import Settings
from deskpool.domain.errors import DeskpoolError
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import CloneMode, PowerState, VmMetadata, VmSpec
from deskpool.domain.profile_hosts import layer_volume_name
from deskpool.domain.profiles import Layer, LayerState, chain, disk_serial
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.fake.remote import AUTHKEY_ENV
from deskpool.drivers.registry import open_driver
from deskpool.images.profile_disks import sha256_of
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.profile_copies import ProfileCopies
from deskpool.services.profiles import ProfileService

USER = "ann"
QUOTA = 64 * 2**20
ROLES = Path(__file__).with_name("r4_cut_processes.py")
KINDS = ("qemu", "broker", "copy")


@dataclass
class World:
    work: Path
    ctx: ServiceContext
    service: ProfileService
    driver: HypervisorDriver
    uri: str
    vm: uuid.UUID
    digests: dict[str, str]
    extents: list[images.Extent]
    sources: dict[str, list[Path]]
    hosts: tuple[uuid.UUID, uuid.UUID]  # A (the desktop's, holding the chain) and B
    driver_b: HypervisorDriver

    def role_args(self, role: str, layer: uuid.UUID) -> list[str]:
        settings = self.ctx.settings
        return [sys.executable, str(ROLES), role, "--data-dir", str(settings.data_dir),
                "--database-url", settings.resolved_database_url,
                "--profile-dir", str(self.service.store_dir), "--hypervisor", self.uri,
                "--vm", str(self.vm), "--layer", str(layer)]


@dataclass
class Tally:
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    bad: list[str] = field(default_factory=list)
    write_s: list[float] = field(default_factory=list)  # uncut write-backs
    logoff_s: list[float] = field(default_factory=list)  # uncut end_session calls
    cut_s: list[float] = field(default_factory=list)  # each whole cut, verification included
    copy_s: list[float] = field(default_factory=list)  # uncut copies to host B


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_hypervisor(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    os.environ[AUTHKEY_ENV] = secrets.token_hex(16)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deskpool.drivers.fake.remote",
                             "--port", str(port)], stderr=(work / "hypervisor.log").open("wb"))
    uri = f"fake+tcp://127.0.0.1:{port}/r4host"
    deadline = time.monotonic() + 30
    while True:
        try:
            open_driver(uri).capacity()
            return proc, uri
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def make_desktop(driver: HypervisorDriver, work: Path) -> uuid.UUID:
    image = work / "root.qcow2"
    images.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    driver.import_volume("base.qcow2", image)
    identity = DesktopIdentity(uuid.uuid4(), "desk-a", new_mac(), new_machine_id())
    spec = VmSpec(vm_id=identity.desktop_id, name="desk-a", base_volume="base.qcow2",
                  clone_mode=CloneMode.LINKED, mac=identity.mac,
                  metadata=VmMetadata(desktop_id=identity.desktop_id, desktop_name="desk-a"),
                  identity_text=identity.to_guest_text())
    driver.create_vm(spec)
    driver.start_vm(spec.vm_id)
    return spec.vm_id


def build_world(work: Path, rng: random.Random, uri: str) -> World:
    ctx = ServiceContext(Settings(data_dir=work / "data",
                                  database_url=f"sqlite:///{work / 'deskpool.db'}"))
    tree = work / "tree-a"
    images.make_tree(tree, rng)
    service = ProfileService(ctx, work / "profiles", skeleton=tree)
    service.ensure_profile(USER, quota_bytes=QUOTA)
    raw = {"A": work / "a.raw", "B": work / "b.raw"}
    images.flatten_to_raw(committed(ctx)[1], raw["A"])
    shutil.copyfile(raw["A"], raw["B"])
    images.mutate(raw["B"], rng, work)
    for name, path in raw.items():
        if (fault := images.fsck_clean(path)) is not None:
            raise SystemExit(f"generation {name} is not a clean filesystem: {fault}")
    digests = {name: images.tree_digest(path) for name, path in raw.items()}
    if digests["A"] == digests["B"]:
        raise SystemExit("generations A and B hold the same files")
    extents = images.differing_extents(raw["A"], raw["B"])
    sources = {name: images.extent_files(path, extents, work / f"extents-{name}")
               for name, path in raw.items()}
    driver = open_driver(uri)
    hosts = HostService(ctx)
    uri_b = uri.replace("/r4host", "/r4host-b")
    # A killed copy's transfer slots free themselves after a minute (host_slots.HOLD_FOR);
    # cuts come faster than that, so the hosts have slots to spare for them.
    limits = HostLimits(transfer_slots=1000)
    host_ids = (hosts.add("a", uri, limits=limits).id,
                hosts.add("b", uri_b, limits=limits).id)
    return World(work, ctx, service, driver, uri, make_desktop(driver, work), digests,
                 extents, sources, host_ids, open_driver(uri_b))


def committed(ctx: ServiceContext) -> tuple[int, Path, str | None]:
    """The profile's generation, its top layer's file and that layer's recorded sha256."""
    with ctx.uow(read_only=True) as uow:
        profile = uow.profiles.get(USER)
        assert profile.layer_id is not None
        top = uow.profiles.layer(profile.layer_id)
        return profile.generation, Path(top.path), top.sha256


def where_cut(world: World, layer_id: uuid.UUID) -> str:
    """Where the killed broker's logoff stopped, from what it left behind."""
    with world.ctx.uow(read_only=True) as uow:
        state = uow.profiles.layer(layer_id).state
    if state is not LayerState.SESSION:
        return f"cut after the commit ({state})"
    plugged = disk_serial(layer_id) in world.driver.attached_disks(world.vm)
    return "cut before the detach" if plugged else "cut between detach and commit"


def holds(world: World) -> tuple[str, str | None]:
    """Which generation the committed profile holds ("A", "B" or "neither") and any fault
    of its chain (recorded checksum, e2fsck)."""
    _gen, top, sha = committed(world.ctx)
    fault = None
    if sha is not None and sha256_of(top) != sha:
        fault = f"top layer {top.name} no longer has its recorded sha256"
    raw = world.work / "check.raw"
    try:
        images.flatten_to_raw(top, raw)
        fsck = images.fsck_clean(raw)
        fault = fault or (f"e2fsck -fn: {fsck}" if fsck else None)
        digest = images.tree_digest(raw)
    finally:
        raw.unlink(missing_ok=True)
    name = next((n for n, d in world.digests.items() if d == digest), "neither")
    return name, fault


def one_cut(world: World, rng: random.Random, n: int, current: str, tally: Tally,
            args: argparse.Namespace) -> str:
    """One session cut as ``kind``; returns the generation the profile holds after it."""
    began = time.monotonic()
    kind = rng.choice(args.kinds.split(","))
    if kind == "copy":
        return copy_cut(world, rng, n, current, tally, args, began)
    target = "B" if current == "A" else "A"
    before, _top, _sha = committed(world.ctx)
    if world.driver.get_vm(world.vm).power_state is not PowerState.RUNNING:
        world.driver.start_vm(world.vm)  # the desktop a killed QEMU left is started again
    session = world.service.start_session(USER, "desk-a", world.driver, world.vm)

    writer = subprocess.Popen(
        images.writer_command(session.path, world.extents, world.sources[target], rng,
                              spread_ms=args.spread_ms),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wrote_at, write_cut = time.monotonic(), False
    expected_write = statistics.median(tally.write_s) if tally.write_s else (
        args.spread_ms / 1000 + 0.5)
    try:
        writer.wait(timeout=rng.uniform(0, 1.2 * expected_write) if kind == "qemu" else 300)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer.wait()
        write_cut = True
    if not write_cut:
        if writer.returncode != 0:
            raise SystemExit(f"the writer failed: {writer.stderr.read().decode()[-400:]}")
        tally.write_s.append(time.monotonic() - wrote_at)
    if write_cut:
        # QEMU is gone, and the disk with it (the fake's VM stops: its process is dead).
        world.driver.stop_vm(world.vm, force=True)

    # After a killed QEMU: the desktop stays down and no logoff runs (only the recovery finds
    # the layer), or the logoff finds a guest that does not answer, or the desktop was
    # started again (without the disk: it was plugged in live only) and its guest answers
    # session-hook end at once ("no profile" mounted).
    after_kill = rng.choice(("no logoff", "guest gone", "desktop restarted"))
    if write_cut and after_kill == "no logoff":
        return finish(world, session.layer_id, n, kind, "write-back cut, no logoff",
                      (before, current, target, write_cut), tally, args, began)
    if write_cut and after_kill == "desktop restarted":
        world.driver.start_vm(world.vm)
    answered = not write_cut or after_kill == "desktop restarted"
    broker = subprocess.Popen([*world.role_args("broker", session.layer_id),
                               "--guest-answered", str(int(answered))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert broker.stdin is not None and broker.stdout is not None
    if (line := broker.stdout.readline().strip()) != "ready":
        raise SystemExit(f"the broker did not start: {line} {broker.stderr.read()[-800:]}")
    broker.stdin.write("go\n")
    broker.stdin.flush()
    expected_logoff = statistics.median(tally.logoff_s) if tally.logoff_s else 0.5
    killed = False
    try:
        broker.wait(timeout=rng.uniform(0, 1.3 * expected_logoff) if kind == "broker" else 300)
    except subprocess.TimeoutExpired:
        broker.kill()
        killed = True
    out, err = broker.communicate()
    # Killed after it printed "done": the logoff was over, only the process's exit was cut.
    broker_cut = killed and not out.startswith("done")
    if not killed and (broker.returncode != 0 or not out.startswith("done")):
        raise SystemExit(f"the broker's logoff failed: {err[-800:]}")
    if out.startswith("done") and not write_cut:
        tally.logoff_s.append(float(out.split()[1]))
    moment = (f"write-back cut, {after_kill}" if write_cut else where_cut(world, session.layer_id)
              if broker_cut else "finished before the cut")
    return finish(world, session.layer_id, n, kind, moment, (before, current, target, write_cut),
                  tally, args, began)


def finish(world: World, layer_id: uuid.UUID, n: int, kind: str, moment: str,
           start: tuple[int, str, str, bool], tally: Tally, args: argparse.Namespace,
           began: float) -> str:
    """Recover in a new process, then check what the profile holds; returns which
    generation that is."""
    before, current, target, write_cut = start
    recovery = subprocess.run(world.role_args("recover", layer_id),
                              capture_output=True, text=True, check=False)
    if recovery.returncode != 0:
        raise SystemExit(f"the recovery failed: {recovery.stderr[-800:]}")

    held, fault = holds(world)
    after, _top, _sha = committed(world.ctx)
    with world.ctx.uow(read_only=True) as uow:
        state = uow.profiles.layer(layer_id).state
    problem = fault
    if held == current and after != before:
        problem = problem or f"holds the old files as generation {after} (was {before})"
    elif held == target and (after != before + 1 or write_cut):
        problem = problem or (f"holds the new files as generation {after} (was {before})"
                              + (" though the write-back was cut" if write_cut else ""))
    elif held not in (current, target):
        problem = problem or "holds neither the old nor the new files"
    if state is LayerState.SESSION:
        problem = problem or "its session layer is still open after the recovery"
    outcome = "new" if held == target else "old" if held == current else "neither"
    tally.outcomes[kind][f"{moment}, {outcome}"] += 1
    if problem:
        tally.bad.append(f"cut {n} ({kind}, {moment}): {problem}")
        print(f"cut {n:3}: {kind:6} {moment}: NOT OLD-OR-NEW: {problem}", flush=True)
    tally.cut_s.append(time.monotonic() - began)
    if n % args.flatten_every == 0:
        world.service.flatten(USER)
        world.service.sweep(USER)
        for sentence in world.service.verify(USER):  # every kept layer's recorded sha256
            tally.bad.append(f"after cut {n}, verify: {sentence}")
    if args.verbose:
        print(f"cut {n:3}: {kind:6} {moment:24} -> {outcome} "
              f"(generation {after}, {recovery.stdout.strip()})", flush=True)
    return held


def copy_cut(world: World, rng: random.Random, n: int, current: str, tally: Tally,
             args: argparse.Namespace, began: float) -> str:
    """One copy of the chain to host B, SIGKILLed at a random moment; returns the generation
    the profile holds after it (always the one it held: a copy never changes it)."""
    host_a, host_b = world.hosts
    before, _top, _sha = committed(world.ctx)
    with world.ctx.uow(read_only=True) as uow:
        top = uow.profiles.get(USER).layer_id
        assert top is not None
        links = chain(uow.profiles.layers(USER), top)
    copies = ProfileCopies(world.ctx)
    for link in links:  # A holds the chain (its desktop wrote it); B none of it
        # (A layer a flatten rebased keeps a stale copy on A from an earlier cut: it is not
        # registered again and stays in the profile store every host reaches.)
        copies.register(link.id, host_a, world.driver)
        world.driver_b.delete_volume(layer_volume_name(link.id))
    with world.ctx.uow() as uow:
        for link in links:
            uow.profile_holders.forget(link.id, host_b)
        uow.commit()
    proc = subprocess.Popen([*world.role_args("copy", top), "--host-b", str(host_b),
                             "--chunk-ms", str(args.copy_chunk_ms)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if (line := proc.stdout.readline().strip()) != "ready":
        _out, err = proc.communicate()
        raise SystemExit(f"the copy did not start: {line} {err[-800:]}")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    expected = statistics.median(tally.copy_s) if tally.copy_s else 1.0
    killed = False
    try:
        proc.wait(timeout=rng.uniform(0, 1.3 * expected))
    except subprocess.TimeoutExpired:
        proc.kill()
        killed = True
    out, err = proc.communicate()
    if not killed and (proc.returncode != 0 or not out.startswith("done")):
        raise SystemExit(f"the copy failed: {err[-800:]}")
    if out.startswith("done"):
        tally.copy_s.append(float(out.split()[1]))
        moment = "finished before the cut"
    else:
        held = held_on_b(world, links)
        moment = (f"cut in layer {len(held) + 1} of {len(links)}" if len(held) < len(links)
                  else "cut after the last layer")
    recovery = subprocess.run(world.role_args("recover", top), capture_output=True,
                              text=True, check=False)
    if recovery.returncode != 0:
        raise SystemExit(f"the recovery failed: {recovery.stderr[-800:]}")
    problem = copy_problem(world, links, before, current)
    if problem is None:  # copying again completes, whatever the cut left
        copies.bring_chain(USER, top, host_b)
        if copies.lacking(USER, top, host_b):
            problem = "copying the chain again after the recovery did not complete"
        problem = problem or copy_problem(world, links, before, current)
    tally.outcomes["copy"][f"{moment}, old"] += 1
    if problem:
        tally.bad.append(f"cut {n} (copy, {moment}): {problem}")
        print(f"cut {n:3}: copy   {moment}: BAD: {problem}", flush=True)
    tally.cut_s.append(time.monotonic() - began)
    if args.verbose:
        print(f"cut {n:3}: copy   {moment:24} -> old (generation {before})", flush=True)
    return current


def held_on_b(world: World, links: list[Layer]) -> set[uuid.UUID]:
    """The chain's layers recorded as held by host B."""
    with world.ctx.uow(read_only=True) as uow:
        holders = uow.profile_holders.holders([link.id for link in links])
    return {link.id for link in links if world.hosts[1] in holders.get(link.id, set())}


def copy_problem(world: World, links: list[Layer], before: int, current: str) -> str | None:
    """What a cut copy left wrong after the recovery, if anything."""
    leftovers = [v for v in world.driver_b.list_volumes() if v.endswith(".part")]
    if leftovers:
        return f"partial volumes left on host B: {leftovers}"
    if ProfileCopies(world.ctx).copies():
        return "a copy record is left after the recovery"
    for link in links:
        if link.id not in held_on_b(world, links):
            continue
        try:
            data = b"".join(world.driver_b.read_volume(layer_volume_name(link.id)))
        except DeskpoolError as exc:
            return f"host B is recorded holding layer {link.id}, which it lacks: {exc}"
        if hashlib.sha256(data).hexdigest() != link.sha256:
            return f"host B is recorded holding layer {link.id}, but its bytes there differ"
    held, fault = holds(world)
    after, _top, _sha = committed(world.ctx)
    if fault or held != current or after != before:
        return fault or f"the profile changed: generation {after} holding {held}"
    return None


def report(tally: Tally, seed: int, cuts: int, elapsed: float) -> None:
    print(f"seed {seed}; {cuts} cuts in {elapsed:.0f} s "
          f"({statistics.mean(tally.cut_s):.1f} s a cut, verification included)")
    if tally.write_s:
        print(f"uncut write-back (qemu-io): median {statistics.median(tally.write_s):.2f} s")
    if tally.logoff_s:
        print(f"uncut logoff (end_session): median {statistics.median(tally.logoff_s):.3f} s")
    for kind in KINDS:
        counts = tally.outcomes.get(kind, Counter())
        shown = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))
        print(f"{kind:6} {sum(counts.values()):3} cuts ({shown or 'none'})")
    if tally.copy_s:
        print(f"uncut copy of the chain to host B: median {statistics.median(tally.copy_s):.2f} s")
    for line in tally.bad:
        print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    parser.add_argument("--spread-ms", type=int, default=800,
                        help="how long the write-back takes, spread over its writes")
    parser.add_argument("--flatten-every", type=int, default=10)
    parser.add_argument("--copy-chunk-ms", type=float, default=20.0,
                        help="the slowed link of a copy between hosts: ms per 256 KiB")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("--verbose", action="store_true", help="one line per cut")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"the cut kinds to choose from (default: {','.join(KINDS)})")
    args = parser.parse_args()
    # SIGTERM ends the run through the cleanup below (the fake hypervisor, the work dir).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="r4-"))
    hypervisor, uri = start_hypervisor(work)
    tally, began, current = Tally(), time.monotonic(), "A"
    try:
        world = build_world(work, rng, uri)
        print(f"generations A and B differ in {len(world.extents)} extents "
              f"({sum(e.length for e in world.extents) // 1024} KiB)", flush=True)
        for n in range(1, args.cuts + 1):
            held = one_cut(world, rng, n, current, tally, args)
            if held not in world.digests:
                print(f"stopping after cut {n}: the profile holds neither generation, and "
                      "every later cut would start from it", flush=True)
                break
            current = held
        world.ctx.close()
    finally:
        hypervisor.kill()
        hypervisor.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(tally, seed, len(tally.cut_s), time.monotonic() - began)
    print(f"R4 {len(tally.bad)}")
    return 0 if not tally.bad else 1


if __name__ == "__main__":
    sys.exit(main())
