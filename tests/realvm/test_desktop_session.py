"""Single sign-on on a real desktop-flavor VM: a user connects through the broker and lands
on their own Xfce session, not LightDM's greeter.

One pool of one desktop, booted once for the module: the greeter is seen on its screen first,
then the user connects. Checked from inside through the guest agent (the account with the
database's uid, logind's active x11 session, Xfce's panel and desktop and the files the
session writes owned by that uid) and from outside (a libvirt screenshot that is graphical
and no longer the greeter's)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker, Handover
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.realvm.conftest import remove_pool_of
from tests.realvm.screens import Screen, analyse, decode_png, png_size, save_png, screenshot

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(900)]
TEMPLATE, POOL = "xfce-sso", "sso"
USER = Identity(name="Sam.Smith@corp.example", display_name="Sam Smith", source="ldap",
                groups=frozenset({"staff"}))
ACCOUNT = "sam_smith"
GREETER_TIMEOUT_S = 300.0
PAINT_TIMEOUT_S = 120.0


@dataclass
class SignedIn:
    ctx: ServiceContext
    agent: GuestAgent
    domain: libvirt.virDomain
    handover: Handover
    connect_s: float  # Connect -> the user's session running
    session_at: float  # time.monotonic() then
    greeter: Path
    screens: Path


def _screen(domain: libvirt.virDomain, path: Path) -> tuple[Screen | None, Path]:
    mime, data = screenshot(domain)
    graphical = "png" not in mime or png_size(data)[0] >= 800
    return (analyse(mime, data) if graphical else None), save_png(mime, data, path)


@pytest.fixture(scope="module")
def signed_in(desktop_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[SignedIn]:
    root = tmp_path_factory.mktemp("desktop-session")
    screens = tmp_path_factory.mktemp("screens")
    ctx = ServiceContext(Settings(data_dir=root / "data"))
    conn = libvirt.open("qemu:///system")
    try:
        HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
        TemplateService(ctx).publish(
            TEMPLATE, ImageFiles.from_guest_image(desktop_image),
            recipe_hash=desktop_image.recipe_hash, memory_mib=desktop_image.memory_mib,
            arch="x86_64")
        PoolService(ctx).create(PoolSpec(POOL, TEMPLATE, spare=1, max_size=1,
                                         naming_pattern=f"{POOL}-{{n:02}}"))
        EntitlementService(ctx).grant(POOL, "group", "staff")
        try:
            created = time.monotonic()
            reconciler = Reconciler(ctx, workers=1, ready_timeout_s=240)
            while not any(d.state == "ready" for d in DesktopService(ctx).list()):
                assert time.monotonic() - created < 420, "the desktop did not become ready"
                report = reconciler.run_pass()
                assert not report.errors, report.errors
            desktop = DesktopService(ctx).list()[0]
            domain = conn.lookupByUUIDString(str(desktop.id))
            while True:  # the greeter first, as a user of a warm pool finds it
                screen, greeter = _screen(domain, screens / "greeter.png")
                if screen is not None and screen.is_graphical():
                    break
                assert time.monotonic() - created < GREETER_TIMEOUT_S, (
                    f"no greeter on the screen: {screen}, {greeter}")
                time.sleep(3)
            print(f"create -> greeter: {time.monotonic() - created:.1f} s ({greeter})")
            broker = Broker(ctx, ready_timeout_s=120)
            start = time.monotonic()
            handover = broker.connect(USER, POOL)
            connect_s = time.monotonic() - start
            broker.records.flush()
            if handover.status != "ready":
                with ctx.uow(read_only=True) as uow:
                    print("events:", [e.message for e in uow.events.recent(20)])
            yield SignedIn(ctx, GuestAgent(ctx.driver_for_name("local"), desktop.id), domain,
                           handover, connect_s, time.monotonic(), greeter, screens)
        finally:
            PoolService(ctx).resize(POOL, min_size=0, spare=0)
            for d in DesktopService(ctx).list():
                DesktopService(ctx).delete(str(d.id))
    finally:
        conn.close()
        ctx.close()
        remove_pool_of(root / "pool")


def _run(s: SignedIn, argv: list[str]) -> str:
    code, out, err = s.agent.exec_capture(argv, timeout_s=60)
    assert code == 0, (argv, code, out, err)
    return out


def _uid(s: SignedIn) -> int:
    with s.ctx.uow(read_only=True) as uow:
        found = uow.linux_accounts.find(USER.name)
    assert found is not None and found[0] == ACCOUNT
    return found[1]


def test_connect_lands_in_the_users_session(signed_in: SignedIn) -> None:
    h = signed_in.handover
    print(f"Connect -> session running: {signed_in.connect_s:.1f} s; phases {h.phases_ms}")
    assert h.status == "ready", h.message
    assert "session" in h.phases_ms


def test_the_account_has_the_databases_uid(signed_in: SignedIn) -> None:
    uid = _uid(signed_in)
    entry = _run(signed_in, ["/usr/bin/getent", "passwd", ACCOUNT]).strip().split(":")
    assert entry[2:7] == [str(uid), str(uid), "Sam Smith", f"/home/{ACCOUNT}", "/bin/bash"]
    groups = _run(signed_in, ["/usr/bin/id", "-nG", ACCOUNT]).split()
    assert {"audio", "video"} <= set(groups)


def test_logind_shows_the_users_graphical_session_active(signed_in: SignedIn) -> None:
    rows = _run(signed_in, ["/usr/bin/loginctl", "list-sessions", "--no-legend"])
    ids = [line.split()[0] for line in rows.splitlines() if ACCOUNT in line.split()]
    assert ids, rows
    props = _run(signed_in, ["/usr/bin/loginctl", "show-session", ids[0], "-p", "Type",
                             "-p", "State", "-p", "Seat", "-p", "Name"])
    assert {"Type=x11", "State=active", "Seat=seat0", f"Name={ACCOUNT}"} <= set(
        props.split()), props
    # The one-shot autologin is gone once the session runs.
    code, _, _ = signed_in.agent.exec_capture(
        ["/usr/bin/test", "-e", "/etc/lightdm/lightdm.conf.d/90-deskpool-autologin.conf"])
    assert code == 1


def test_xfce_runs_as_the_user_and_their_files_are_theirs(signed_in: SignedIn) -> None:
    uid = _uid(signed_in)
    for program in ("xfdesktop", "xfce4-panel", "xfce4-session"):
        assert _run(signed_in, ["/usr/bin/pgrep", "-u", str(uid), "-x", program]).split()
    files = _run(signed_in, ["/usr/bin/find", f"/home/{ACCOUNT}", "-mindepth", "1",
                             "-printf", r"%U %P\n"]).splitlines()
    made = [f for f in files if f.split(" ", 1)[1] not in (".bashrc", ".profile",
                                                             ".bash_logout")]
    assert made, f"the session wrote nothing in its home: {files}"
    assert all(f.split(" ", 1)[0] == str(uid) for f in files), files
    print(f"files the session made: {len(made)}, e.g. {made[:4]}")


def test_the_screen_shows_the_session_not_the_greeter(signed_in: SignedIn) -> None:
    # Xfce's processes run a little before they have painted under TCG: a short wait.
    deadline = time.monotonic() + PAINT_TIMEOUT_S
    while True:
        screen, shot = _screen(signed_in.domain, signed_in.screens / "session.png")
        if (screen is not None and screen.is_graphical()) or time.monotonic() >= deadline:
            break
        time.sleep(3)
    print(f"session screenshot: {shot} ({screen}); greeter: {signed_in.greeter}; "
          f"painted {time.monotonic() - signed_in.session_at:.1f} s after the session ran")
    if screen is None or not screen.is_graphical():
        _, log, _ = signed_in.agent.exec_capture(
            ["/usr/bin/tail", "-n", "40", f"/home/{ACCOUNT}/.xsession-errors"])
        pytest.fail(f"the session's screen is blank: {screen}, {shot}\n{log}")
    w1, h1, before = decode_png(signed_in.greeter.read_bytes())
    w2, h2, after = decode_png(shot.read_bytes())
    if (w1, h1) == (w2, h2):
        changed = sum(before[i:i + 3] != after[i:i + 3] for i in range(0, len(after), 3))
        share = changed / (w2 * h2)
        print(f"pixels changed since the greeter: {share:.0%}")
        assert share > 0.2, f"the screen still looks like the greeter: {shot}"


def test_a_reconnect_finds_the_session_running(signed_in: SignedIn) -> None:
    start = time.monotonic()
    again = Broker(signed_in.ctx).connect(USER, POOL)
    print(f"reconnect: {time.monotonic() - start:.1f} s; phases {again.phases_ms}")
    assert again.status == "ready" and again.reconnect
    assert again.desktop_id == signed_in.handover.desktop_id
    assert again.phases_ms.get("session", 0) < 20_000
