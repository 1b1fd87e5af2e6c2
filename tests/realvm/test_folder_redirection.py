"""Folder redirection on a real desktop-flavor VM (issue 13 item 5): the guest side.

A real smbd the test starts (``tests.samba_server``, on a free port of the host's loopback,
which the guest's user-mode network reaches as 10.0.2.2) and a pool of one desktop with
``redirect_folders = Documents``. Ann connects: her ~/Documents must be a bind of the cifs
share the hook mounted with the credentials the broker wrote, owned by her uid, the
credentials file gone and the password in no process's command line; a file she writes in
~/Documents is on the server before she logs off. After the logoff the guest has no share
mounted and the server's account is disabled. Timings printed with ``-s``.

Not run where the functional tests run (no VMs there); the command is
``pytest -n 0 -s tests/realvm/test_folder_redirection.py`` on a machine that may boot VMs
(it builds the desktop image if the cached one predates this hook).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.fileshare.samba import account_for
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.realvm.conftest import remove_pool_of
from tests.samba_server import SambaForTests, needs_samba

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(1800)]
TEMPLATE, POOL = "xfce-share", "share"
ANN = Identity(name="ann", display_name="Ann", source="local", groups=frozenset({"staff"}))
NOTE = "saved in Documents on the desktop\n"


@dataclass
class World:
    ctx: ServiceContext
    samba: SambaForTests
    reconciler: Reconciler
    broker: Broker


@pytest.fixture(scope="module")
def world(desktop_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    needs_samba()
    root = tmp_path_factory.mktemp("share")
    samba = SambaForTests(quota_mib=64).start()
    lay = samba.layout
    ctx = ServiceContext(Settings(
        data_dir=root / "data", fileshare_dir=lay.state_dir, fileshare_root=lay.share_root,
        fileshare_port=lay.port, fileshare_listen=lay.listen, fileshare_quota_mib=64,
        fileshare_account_prefix=lay.account_prefix, fileshare_guest_address="10.0.2.2"))
    try:
        HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
        TemplateService(ctx).publish(
            TEMPLATE, ImageFiles.from_guest_image(desktop_image),
            recipe_hash=desktop_image.recipe_hash, memory_mib=desktop_image.memory_mib,
            arch="x86_64")
        PoolService(ctx).create(PoolSpec(POOL, TEMPLATE, min_size=1, spare=1, max_size=1,
                                         naming_pattern=f"{POOL}-{{n:02}}",
                                         redirect_folders=("Documents",),
                                         session_start_timeout_s=600))
        EntitlementService(ctx).grant(POOL, "group", "staff")
        try:
            reconciler = Reconciler(ctx, workers=1, ready_timeout_s=300)
            started = time.monotonic()
            while not any(d.state == "ready" for d in DesktopService(ctx).list()):
                assert time.monotonic() - started < 600, "the desktop did not become ready"
                report = reconciler.run_pass()
                assert not report.errors, report.errors
            yield World(ctx, samba, reconciler, Broker(ctx, ready_timeout_s=120))
        finally:
            PoolService(ctx).resize(POOL, min_size=0, spare=0)
            for d in DesktopService(ctx).list():
                DesktopService(ctx).delete(str(d.id))
    finally:
        ctx.close()
        remove_pool_of(root / "pool")
        samba.stop()


def run(agent: GuestAgent, script: str, *, user: str | None = None) -> str:
    argv = ["/bin/sh", "-c", script]
    if user is not None:
        argv = ["/usr/sbin/runuser", "-u", user, "--", "/bin/sh", "-c", script]
    code, out, err = agent.exec_capture(argv, timeout_s=90)
    assert code == 0, (script, code, out, err)
    return out


def test_documents_saved_on_the_desktop_are_on_the_server_before_logoff(world: World) -> None:
    w = world
    started = time.monotonic()
    handover = w.broker.connect(ANN, POOL)
    print(f"\nconnect -> ready with the share: {time.monotonic() - started:.1f} s "
          f"(phases {handover.phases_ms})")
    for event in recent_events(w.ctx):
        if event.kind == "fileshare-unavailable":
            print(f"fileshare-unavailable: {event.message}", flush=True)
            if handover.desktop_id is not None:  # the guest's kernel says why
                said = GuestAgent(w.ctx.driver_for_name("local"), handover.desktop_id
                                  ).exec_capture(["/bin/sh", "-c", "dmesg | tail -25"])
                print(f"guest kernel log:\n{said[1]}", flush=True)
    assert handover.status == "ready" and "local folders" not in handover.message, (
        handover.message, [e.message for e in recent_events(w.ctx)
                           if e.kind == "fileshare-unavailable"])
    assert handover.desktop_id is not None
    with w.ctx.uow(read_only=True) as uow:
        found = uow.linux_accounts.find(ANN.name)
    assert found is not None
    account, uid = found
    share = account_for(w.samba.layout, uid)
    agent = GuestAgent(w.ctx.driver_for_name("local"), handover.desktop_id,
                       command_timeout_s=30)
    mounts = run(agent, f"findmnt -n -o FSTYPE,SOURCE,TARGET --target /home/{account}/Documents")
    assert mounts.split()[0] == "cifs" and share in mounts, mounts
    assert run(agent, f"stat -c '%u %a' /home/{account}/Documents").split() == [str(uid), "700"]
    assert run(agent, "ls -A /run/deskpool-creds").strip() == ""  # used, then deleted
    assert "password" not in run(agent, "ps -eo args")
    run(agent, f"printf '{NOTE}' > ~/Documents/note.txt", user=account)
    on_server = w.samba.layout.share_root / share / "Documents" / "note.txt"
    assert on_server.read_text() == NOTE  # before logoff

    SessionService(w.ctx).log_off(handover.desktop_id, by=None, reason="the test logs off")
    started = time.monotonic()
    while True:
        report = w.reconciler.run_pass()
        assert not report.errors, report.errors
        (now,) = [d for d in DesktopService(w.ctx).list() if d.id == handover.desktop_id]
        if now.state == "ready":
            break
        assert time.monotonic() - started < 300, now.state
    print(f"logoff -> unmounted, revoked, reverted: {time.monotonic() - started:.1f} s")
    pdb = subprocess.run(["pdbedit", "-s", str(w.samba.layout.config), "-v", "-u", share],
                         capture_output=True, text=True, check=False)
    assert "Account Flags:        [DU" in pdb.stdout, pdb.stdout
    assert on_server.read_text() == NOTE  # kept on the server
