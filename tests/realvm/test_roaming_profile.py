"""A user's home follows them between real desktop-flavor VMs (roaming profiles, issue 13).

One pool of two desktops with ``roaming_profiles``, booted once for the module. Ann connects
through the broker and lands on desktop A (the first free by name), her home the profile disk
the broker plugged in; she writes a file and an Xfce setting (through xfconf, as her session
does), a cache file and a file in the pool's excluded folder, then logs off: the
reconciler's recycle ends her session in the guest, unmounts, detaches and commits
generation 2, then reverts A. Bob then takes A (so A is not free) and finds nothing of
Ann's; Ann connects again, is handed B, and finds her file and her setting, owned by her
uid, and neither the cache nor the excluded file. Timings printed with ``-s``.

Then a second concurrent session (a second pool of one desktop, C, whose policy merges): Ann,
still on B, connects to C too; both sessions change her home (a file each, one file both, a
file deleted on C). B logs off first and commits; C's logoff is merged file by file: every
file is in the profile, the overlap kept as B wrote it with C's copy beside it, and Ann told.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.profile_merge import EntryKind
from deskpool.domain.profiles import LayerState
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.images.profile_merge import read_side
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import messages_for
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.access_models import Event
from tests.realvm.conftest import remove_pool_of

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(2400)]
TEMPLATE, POOL, SECOND_POOL = "xfce-roam", "roam", "roam2"
ANN = Identity(name="ann@corp.example", display_name="Ann", source="local",
               groups=frozenset({"staff"}))
BOB = Identity(name="bob@corp.example", display_name="Bob", source="local",
               groups=frozenset({"staff"}))
NOTE = "written on desktop A\n"
SETTING = ("xfce4-desktop", "/deskpool/roamed")
SESSION_TIMEOUT_S = 600
EXCLUDED = "Scratch space"  # the pool's own exclusion, besides ~/.cache (a space: quoting)


@dataclass
class World:
    ctx: ServiceContext
    reconciler: Reconciler
    broker: Broker
    a: str  # desktop names, A first by name (the broker's first pick)
    b: str
    c: str  # the second pool's one desktop


@pytest.fixture(scope="module")
def world(desktop_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    root = tmp_path_factory.mktemp("roaming")
    ctx = ServiceContext(Settings(data_dir=root / "data"))
    try:
        HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
        TemplateService(ctx).publish(
            TEMPLATE, ImageFiles.from_guest_image(desktop_image),
            recipe_hash=desktop_image.recipe_hash, memory_mib=desktop_image.memory_mib,
            arch="x86_64")
        PoolService(ctx).create(PoolSpec(POOL, TEMPLATE, min_size=2, spare=2, max_size=2,
                                         naming_pattern=f"{POOL}-{{n:02}}",
                                         roaming_profiles=True,
                                         profile_exclusions=(EXCLUDED,),
                                         # Two Xfce sessions at once on a shared 2-CPU TCG
                                         # host can take minutes; A must not be given up.
                                         session_start_timeout_s=SESSION_TIMEOUT_S))
        # A user's second session merges at its logoff (the policy's default).
        PoolService(ctx).create(PoolSpec(SECOND_POOL, TEMPLATE, min_size=1, spare=1,
                                         max_size=1, naming_pattern="roamc-{n:02}",
                                         roaming_profiles=True,
                                         session_start_timeout_s=SESSION_TIMEOUT_S))
        for pool in (POOL, SECOND_POOL):
            EntitlementService(ctx).grant(pool, "group", "staff")
        try:
            started = time.monotonic()
            reconciler = Reconciler(ctx, workers=2, ready_timeout_s=420)
            while sum(d.state == "ready" for d in DesktopService(ctx).list()) < 3:
                assert time.monotonic() - started < 900, "the desktops did not become ready"
                report = reconciler.run_pass()
                assert not report.errors, report.errors
            print(f"\nthree desktops ready in {time.monotonic() - started:.0f} s")
            names = sorted(d.name for d in DesktopService(ctx).list())
            a, b = [n for n in names if n.startswith(f"{POOL}-")]
            (c,) = [n for n in names if n.startswith("roamc-")]
            yield World(ctx, reconciler, Broker(ctx, ready_timeout_s=120), a, b, c)
        finally:
            for pool in (POOL, SECOND_POOL):
                PoolService(ctx).resize(pool, min_size=0, spare=0)
            for d in DesktopService(ctx).list():
                DesktopService(ctx).delete(str(d.id))
    finally:
        ctx.close()
        remove_pool_of(root / "pool")


def agent_of(w: World, name: str) -> GuestAgent:
    (desktop,) = [d for d in DesktopService(w.ctx).list() if d.name == name]
    return GuestAgent(w.ctx.driver_for_name("local"), desktop.id, command_timeout_s=30)


def run(agent: GuestAgent, script: str, *, user: str | None = None) -> str:
    argv = ["/bin/sh", "-c", script]
    if user is not None:  # in the user's session: their uid, their session bus
        argv = ["/usr/sbin/runuser", "-u", user, "--", "/bin/sh", "-c",
                'export DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$(id -u)/bus"; '
                + script]
    code, out, err = agent.exec_capture(argv, timeout_s=90)
    assert code == 0, (script, code, out, err)
    return out


def account(w: World, who: Identity) -> tuple[str, int]:
    with w.ctx.uow(read_only=True) as uow:
        found = uow.linux_accounts.find(who.name)
    assert found is not None
    return found


def generation(w: World, who: Identity) -> int:
    with w.ctx.uow(read_only=True) as uow:
        return uow.profiles.get(who.name).generation


def kernel_times(agent: GuestAgent, since: datetime) -> tuple[float | None, float | None]:
    """Seconds from ``since`` (the session layer's row, just before the attach) to the guest
    kernel seeing a new virtio disk, and to ext4 mounting it, from its log's wall clock."""
    lines = run(agent, "dmesg --time-format iso").splitlines()
    seen = mounted = None
    for line in lines:
        stamp, _, text = line.partition(" ")
        try:
            at = datetime.fromisoformat(stamp.replace(",", ".")).astimezone(UTC)
        except ValueError:
            continue
        if at < since:
            continue
        if seen is None and "virtio_blk" in text and "logical blocks" in text:
            seen = (at - since).total_seconds()
        if mounted is None and "EXT4-fs" in text and "mounted filesystem" in text:
            mounted = (at - since).total_seconds()
    return seen, mounted


def connect(w: World, who: Identity, expect: str, pool: str = POOL) -> float:
    started = time.monotonic()
    handover = w.broker.connect(who, pool)
    took = time.monotonic() - started
    assert handover.status == "ready", handover.message
    assert handover.desktop == expect, (handover.desktop, expect)
    print(f"{who.name} -> {expect}: {took:.1f} s (phases {handover.phases_ms})")
    return took


def log_off_and_recycle(w: World, name: str) -> float:
    (desktop,) = [d for d in DesktopService(w.ctx).list() if d.name == name]
    started = time.monotonic()
    SessionService(w.ctx).log_off(desktop.id, by=None, reason="the test logs off")
    while True:
        report = w.reconciler.run_pass()
        assert not report.errors, report.errors
        (now,) = [d for d in DesktopService(w.ctx).list() if d.name == name]
        if now.state == "ready":
            return time.monotonic() - started
        assert time.monotonic() - started < 300, f"{name} did not come back: {now.state}"


def test_the_home_follows_the_user_to_another_desktop(world: World) -> None:
    w = world
    # --- Ann on A: a file, an Xfce setting, a cache file ------------------------------
    connect(w, ANN, w.a)
    ann, ann_uid = account(w, ANN)
    a = agent_of(w, w.a)
    with w.ctx.uow(read_only=True) as uow:
        (layer,) = [la for la in uow.profiles.layers_in_state(LayerState.SESSION)
                    if la.user == ANN.name]
    assert layer.created_at is not None and layer.desktop == w.a
    since = layer.created_at.replace(tzinfo=UTC)
    seen, mounted = kernel_times(a, since)
    print(f"attach -> disk seen in the guest: {seen} s, -> mounted: {mounted} s")
    assert generation(w, ANN) == 1
    home, cache = run(a, f"findmnt -n -o SOURCE,TARGET --target /home/{ann}; "
                         f"findmnt -n -o TARGET --target /home/{ann}/.cache").splitlines()
    assert home.startswith("/dev/vd") and home.endswith(f" /home/{ann}"), home
    assert cache.strip() == f"/home/{ann}/.cache", cache  # the desktop's own disk
    assert run(a, f"stat -c '%u %a' /home/{ann}").split() == [str(ann_uid), "700"]
    assert run(a, f"findmnt -n -o TARGET --target '/home/{ann}/{EXCLUDED}'").strip() == (
        f"/home/{ann}/{EXCLUDED}")  # bound from the desktop's own disk too
    run(a, f"printf '{NOTE}' > ~/notes.txt && echo junk > ~/.cache/junk.bin && "
           f"echo scratch > ~/'{EXCLUDED}'/scratch.bin && "
           f"xfconf-query -c {SETTING[0]} -p {SETTING[1]} -n -t string -s roamed", user=ann)
    # xfconfd writes its channel file a moment after a change: wait for it on disk.
    deadline = time.monotonic() + 180
    while "roamed" not in run(a, f"cat ~/.config/xfce4/xfconf/xfce-perchannel-xml/"
                                 f"{SETTING[0]}.xml 2>/dev/null || true", user=ann):
        assert time.monotonic() < deadline, "xfconfd never saved the setting"
        time.sleep(2)

    # --- logoff: ended in the guest, committed, A reverted ----------------------------
    off_at = datetime.now(UTC)
    took = log_off_and_recycle(w, w.a)
    assert generation(w, ANN) == 2
    with w.ctx.uow(read_only=True) as uow:
        happened = {e.kind: e.at for e in uow.session.scalars(
            select(Event).where(Event.user_name == ANN.name))}
    assert "profile-committed" in happened and "profile-unclean" not in happened, happened
    committed = (happened["profile-committed"].replace(tzinfo=UTC) - off_at).total_seconds()
    print(f"logoff -> generation 2 committed: {committed:.1f} s; -> {w.a} reverted and "
          f"ready again: {took:.1f} s")

    # --- Bob takes A: nothing of Ann's there ------------------------------------------
    connect(w, BOB, w.a)
    bob, _ = account(w, BOB)
    a = agent_of(w, w.a)
    assert run(a, f"ls -A ~ ; test ! -e /home/{ann}/notes.txt && echo clean", user=bob
               ).split()[-1] == "clean"
    assert run(a, "find /home /var/cache/deskpool-home -xdev -name notes.txt -o "
                  "-name junk.bin -o -name scratch.bin").strip() == ""

    # --- Ann on B: her file and setting, hers, no cache -------------------------------
    connect(w, ANN, w.b)
    b = agent_of(w, w.b)
    assert run(b, "cat ~/notes.txt", user=ann) == NOTE
    assert run(b, f"xfconf-query -c {SETTING[0]} -p {SETTING[1]}", user=ann).strip() == "roamed"
    owners = run(b, f"find /home/{ann} -xdev -mindepth 1 -path /home/{ann}/lost+found "
                    "-prune -o -printf '%U %P\\n'").splitlines()
    assert owners and all(line.split(" ", 1)[0] == str(ann_uid) for line in owners), owners
    # Her cache stayed on A: ~/.cache on B is B's own (the new session's files only).
    assert run(b, f"findmnt -n -o TARGET --target /home/{ann}/.cache; "
                  f"test ! -e /home/{ann}/.cache/junk.bin && echo no-junk").split() == [
        f"/home/{ann}/.cache", "no-junk"]
    assert run(b, f"test -d ~/'{EXCLUDED}' && test ! -e ~/'{EXCLUDED}'/scratch.bin && "
                  "echo kept-out", user=ann).strip() == "kept-out"
    assert generation(w, ANN) == 2  # her open session commits at its own logoff


def test_a_second_session_is_merged_at_its_logoff_and_nothing_is_lost(world: World) -> None:
    """Follows the test above: Ann's session on B is open on generation 2."""
    w = world
    ann, _ = account(w, ANN)
    b = agent_of(w, w.b)
    assert run(b, "cat ~/notes.txt", user=ann) == NOTE
    run(b, "echo 'shared, as B wrote it' > ~/shared.txt && echo b > ~/only-b.txt", user=ann)

    connect(w, ANN, w.c, SECOND_POOL)  # her second session: a throw-away overlay, merged
    c = agent_of(w, w.c)
    assert run(c, "cat ~/notes.txt", user=ann) == NOTE  # generation 2, as B started from
    run(c, "echo 'shared, as C wrote it' > ~/shared.txt && echo c > ~/only-c.txt && "
           "rm ~/notes.txt", user=ann)

    log_off_and_recycle(w, w.b)  # the first to log off commits as it is
    assert generation(w, ANN) == 3
    took = log_off_and_recycle(w, w.c)  # the second is merged into what B committed
    assert generation(w, ANN) == 4
    print(f"second session logged off and merged: {took:.1f} s")

    with w.ctx.uow(read_only=True) as uow:
        profile = uow.profiles.get(ANN.name)
        assert profile.layer_id is not None
        committed = Path(uow.profiles.layer(profile.layer_id).path)
    with tempfile.TemporaryDirectory() as scratch:
        side = read_side(committed, Path(scratch), "home")
        home = {rel: (side.files / rel).read_text() for rel, entry in side.tree.items()
                if entry.kind is EntryKind.FILE and "/" not in rel
                and not rel.startswith(".")}
    assert home == {"shared.txt": "shared, as B wrote it\n",
                    f"shared.txt.conflict-{w.c}": "shared, as C wrote it\n",
                    "only-b.txt": "b\n", "only-c.txt": "c\n"}, home
    merged = [m for m in messages_for(w.ctx, ANN.name) if m.kind == "profile-merged"]
    assert merged and "shared.txt" in merged[-1].message and w.c in merged[-1].message, (
        merged)
