"""Folder redirection to a real Samba server (issue 13 item 5), no VMs.

The test starts its own smbd (``tests.samba_server``: deskpool's smb.conf, a free port) and
points the broker's settings at it. Desktops are the fake driver's, with a scripted session
hook (as in test_profile_logon) standing in for the guest: at ``start --share`` it reads
the credentials file the broker wrote through the fake guest agent and uses it against
the real server with smbclient, as the real hook's ``mount -t cifs`` would; so what is
proven about the credentials (which share they open, that they stop working at logoff) is
proven of the exact bytes the broker handed the guest. The real hook's shell code is
syntax-checked here, and run against this smbd with ``mount -t cifs`` where the kernel
has cifs (skipped with the reason where it has not)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import DriverError, InvalidInput, Unavailable
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake.guest import FakeGuest, _Process
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.fileshare.samba import account_for
from deskpool.reconciler.loop import Reconciler
from deskpool.services.events import messages_for
from deskpool.services.fileshare import credentials_path
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.profile_desktops import SESSION_HOOK
from deskpool.store.access_models import Event
from deskpool.store.models import Desktop
from tests.broker_world import BrokerWorld, make_world
from tests.functional.test_profile_views import DESKPOOL
from tests.samba_server import SambaForTests, needs_samba

HOOK_FILE = (Path(__file__).resolve().parents[2]
             / "deskpool/images/guest-desktop/usr/lib/deskpool/session-hook")
ANN = Identity(name="ann", display_name="Ann", source="local", groups=frozenset({"staff"}))
BEN = Identity(name="ben", display_name="Ben", source="local", groups=frozenset({"staff"}))
FOLDERS = ("Documents", "Desktop", "Downloads")


def _credentials(text: bytes) -> tuple[str, str]:
    fields = dict(line.split("=", 1) for line in text.decode().splitlines() if "=" in line)
    return fields["username"], fields["password"]


@dataclass
class GuestShares:
    """The scripted hook: what each ``start --share`` found and did on the real server."""

    samba: SambaForTests
    mounted: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # host: share, u, pw
    starts: list[list[str]] = field(default_factory=list)
    unshares: list[str] = field(default_factory=list)
    guest_cannot_mount: bool = False
    session_starts: bool = True

    def start(self, guest: FakeGuest, argv: list[str]) -> tuple[int, str, str]:
        self.starts.append(argv)
        opts, i = {}, 2
        while argv[i].startswith("--"):
            opts[argv[i]] = argv[i + 1]
            i += 2
        if "--share" not in opts:
            return 0, "starting\n", ""
        cred_path = opts["--share-credentials"]
        user, password = _credentials(guest._files.pop(cred_path))  # read, then deleted
        share = opts["--share"].rsplit("/", 1)[1]
        if self.guest_cannot_mount:
            return 0, "starting\nshare-failed: could not mount: Host is down\n", ""
        made = self.samba.smbclient(share, user, password,
                                    "; ".join(f'mkdir "{f}"' for f in FOLDERS))
        if made.returncode != 0:
            return 0, f"starting\nshare-failed: {made.stdout.strip()}\n", ""
        self.mounted[guest._hostname()] = (share, user, password)
        return 0, "starting\n", ""


@pytest.fixture()
def samba() -> Iterator[SambaForTests]:
    needs_samba()
    server = SambaForTests(quota_mib=8).start()
    yield server
    server.stop()


@pytest.fixture()
def guest(samba: SambaForTests, monkeypatch: pytest.MonkeyPatch) -> GuestShares:
    script = GuestShares(samba)
    original = FakeGuest.execute

    def execute(fake: FakeGuest, command: str, arguments: dict[str, Any]) -> Any:
        fake._files.setdefault(SESSION_HOOK, b"#!/bin/sh\n")  # the desktop flavor's file
        argv = [str(a) for a in arguments.get("arg", [])]
        if command == "guest-exec" and argv[:1] == [SESSION_HOOK]:
            sub = argv[1]
            code, out, err = 0, "", ""
            if sub == "start":
                code, out, err = script.start(fake, argv)
            elif sub == "unshare":
                script.unshares.append(argv[2])
                script.mounted.pop(fake._hostname(), None)
            elif sub == "status":
                out = '{"sessions": []}\n'
            elif sub in ("wait", "check"):
                code = 0 if script.session_starts else 1
            fake._next_id += 1
            fake._procs[fake._next_id] = _Process(code, out.encode(), err.encode(), True)
            return {"pid": fake._next_id}
        return original(fake, command, arguments)

    monkeypatch.setattr(FakeGuest, "execute", execute)
    return script


@pytest.fixture()
def world(tmp_path: Path, samba: SambaForTests) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    lay = samba.layout
    w.ctx.settings = w.ctx.settings.model_copy(update={
        "fileshare_dir": lay.state_dir, "fileshare_root": lay.share_root,
        "fileshare_port": lay.port, "fileshare_listen": lay.listen,
        "fileshare_quota_mib": lay.quota_mib, "fileshare_account_prefix": lay.account_prefix,
        "fileshare_guest_address": "127.0.0.1"})
    w.pool("lab", spare=2, max_size=3, redirect_folders=FOLDERS)
    EntitlementService(w.ctx).grant("lab", "group", "staff")
    w.fill(passes=2)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def events(w: BrokerWorld, kind: str) -> list[tuple[str, str]]:
    with w.ctx.uow(read_only=True) as uow:
        return [(e.severity, e.message) for e in uow.session.scalars(
            select(Event).where(Event.kind == kind))]


def log_off_and_recycle(w: BrokerWorld, desktop_id: uuid.UUID) -> None:
    SessionService(w.ctx).log_off(desktop_id, by=None, reason="the user logged off")
    reconciler = Reconciler(w.ctx, workers=1, ready_timeout_s=5)
    for _ in range(3):
        report = reconciler.run_pass()
        assert not report.errors, report.errors
        with w.ctx.uow(read_only=True) as uow:
            desktop = uow.session.get(Desktop, desktop_id)
            assert desktop is not None
            if desktop.state.value == "ready":
                return
    raise AssertionError("the desktop did not come back to ready")


def uid_of(w: BrokerWorld, user: str) -> int:
    with w.ctx.uow(read_only=True) as uow:
        found = uow.linux_accounts.find(user)
    assert found is not None
    return found[1]


def test_a_document_saved_in_documents_is_on_the_server_before_logoff(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests, tmp_path: Path) -> None:
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready" and "local folders" not in handover.message
    (start,) = guest.starts
    share = account_for(samba.layout, uid_of(world, "ann"))
    assert start[start.index("--share") + 1] == f"//127.0.0.1/{share}"
    assert [start[i + 1] for i, a in enumerate(start) if a == "--redirect"] == list(FOLDERS)
    # The password is in no argument (a ps in the guest would show it), no event, no row.
    _share, user, password = guest.mounted[handover.hostname or ""]
    assert user == share and len(password) >= 32 and password not in " ".join(start)
    with world.ctx.uow(read_only=True) as uow:
        assert not any(password in (e.message or "") for e in uow.session.scalars(
            select(Event)))
    dump = subprocess.run(["sqlite3", str(world.ctx.settings.data_dir / "deskpool.db"),
                           ".dump"], capture_output=True, text=True, check=False)
    if dump.returncode == 0:
        assert password not in dump.stdout and "deskpool.db" not in dump.stderr
    # The credentials went through the agent to the one path the hook accepts.
    assert start[start.index("--share-credentials") + 1] == credentials_path("ann")
    # Ann saves a document in Documents: on the server at once, seen from outside VDI.
    doc = tmp_path / "report.odt"
    doc.write_bytes(b"quarterly figures\n")
    saved = samba.smbclient(share, user, password, f'put "{doc}" "Documents/report.odt"')
    assert saved.returncode == 0, saved.stdout + saved.stderr
    on_server = samba.layout.share_root / share / "Documents" / "report.odt"
    assert on_server.read_bytes() == b"quarterly figures\n"
    st = on_server.stat()
    assert st.st_mode & 0o777 == 0o600
    assert (samba.layout.share_root / share).stat().st_mode & 0o777 == 0o700


def test_the_credential_stops_working_at_logoff_and_a_new_one_is_issued_next_time(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.desktop_id is not None
    share, user, password = guest.mounted[handover.hostname or ""]
    assert samba.smbclient(share, user, password, "ls").returncode == 0
    # A connection open across the logoff (as the guest's cifs mount is) is cut too.
    held = subprocess.Popen(
        ["smbclient", f"//127.0.0.1/{share}", "-p", str(samba.layout.port), "-U", user,
         "-m", "SMB3"], env={"PATH": "/usr/bin:/bin", "PASSWD": password},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    time.sleep(1.5)  # connected and authenticated
    log_off_and_recycle(world, handover.desktop_id)
    out, _ = held.communicate("ls\n", timeout=30)
    assert "NT_STATUS_CONNECTION_DISCONNECTED" in out, out
    assert guest.unshares == ["ann"]  # unmounted in the guest, then revoked on the server
    refused = samba.smbclient(share, user, password, "ls")
    assert refused.returncode != 0 and "LOGON_FAILURE" in refused.stdout + refused.stderr
    assert any("closed at logoff" in m for _s, m in events(world, "fileshare-closed"))
    with world.ctx.uow(read_only=True) as uow:
        assert uow.desktops.get(handover.desktop_id).share_user is None
    # The next logon gets a password of its own; the file share and its files are the same.
    again = Broker(world.ctx).connect(ANN, "lab")
    share2, _user, password2 = guest.mounted[again.hostname or ""]
    assert share2 == share and password2 != password
    assert samba.smbclient(share, user, password2, "ls").returncode == 0


def test_another_users_credential_opens_neither_the_share_nor_its_files(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests, tmp_path: Path) -> None:
    a = Broker(world.ctx).connect(ANN, "lab")
    b = Broker(world.ctx).connect(BEN, "lab")
    share_a, user_a, pw_a = guest.mounted[a.hostname or ""]
    share_b, user_b, pw_b = guest.mounted[b.hostname or ""]
    assert share_a != share_b
    secret = tmp_path / "secret.txt"
    secret.write_text("ann's only\n")
    assert samba.smbclient(share_a, user_a, pw_a,
                           f'put "{secret}" "Documents/secret.txt"').returncode == 0
    # Ben's credential, on Ann's share: refused at the tree connect.
    denied = samba.smbclient(share_a, user_b, pw_b, "ls")
    assert denied.returncode != 0 and "ACCESS_DENIED" in denied.stdout + denied.stderr
    # Nor can he list it among the server's shares, or climb out of his own.
    listed = subprocess.run(
        ["smbclient", "-L", "//127.0.0.1", "-p", str(samba.layout.port), "-U", user_b,
         "-m", "SMB3"], env={"PATH": "/usr/bin:/bin", "PASSWD": pw_b}, capture_output=True,
        text=True, timeout=60, check=False)
    assert share_a not in listed.stdout
    climbed = samba.smbclient(share_b, user_b, pw_b, f'get "../{share_a}/Documents/secret.txt" '
                              f'"{tmp_path / "stolen"}"')
    assert climbed.returncode != 0 and not (tmp_path / "stolen").exists()
    # A link to Ann's share inside Ben's (an admin's slip on the server): smbd acts as
    # Ben's own Unix account, which the kernel keeps out of Ann's 0700 directory.
    (samba.layout.share_root / share_b / "to-ann").symlink_to(samba.layout.share_root / share_a)
    via_link = samba.smbclient(share_b, user_b, pw_b, 'ls "to-ann/Documents/*"')
    assert "secret.txt" not in via_link.stdout
    # On the server itself, Ben's account cannot read Ann's directory either.
    peek = subprocess.run(["runuser", "-u", user_b, "--", "ls",
                           str(samba.layout.share_root / share_a)],
                          capture_output=True, text=True, check=False)
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    # Ann's own credential does not open Ben's share.
    assert samba.smbclient(share_b, user_a, pw_a, "ls").returncode != 0


def test_a_share_over_its_quota_leaves_local_folders_and_tells_both(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    first = Broker(world.ctx).connect(ANN, "lab")
    assert first.desktop_id is not None
    share, _user, _pw = guest.mounted[first.hostname or ""]
    # The share reports the quota (8 MiB) as its size to clients.
    _s, user, password = guest.mounted[first.hostname or ""]
    sized = samba.smbclient(share, user, password, "du")
    assert "8192 blocks of size 1024" in sized.stdout, sized.stdout
    log_off_and_recycle(world, first.desktop_id)
    big = samba.layout.share_root / share / "Documents" / "video.bin"
    big.write_bytes(os.urandom(9 << 20))  # 9 MiB, over the 8 MiB quota
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready", handover.message
    assert "local folders" in handover.message and "Documents" in handover.message
    assert "--share" not in guest.starts[-1]
    (admin,) = events(world, "fileshare-unavailable")
    assert admin[0] == "error" and "quota of 8 MiB" in admin[1], admin
    (told,) = [m for m in messages_for(world.ctx, "ann") if m.kind == "folders-local"]
    assert "not redirected" in told.message and str(samba.root) not in told.message


def test_a_server_that_is_down_still_gives_a_desktop_with_local_folders(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    samba.kill()
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready", handover.message
    assert "with local folders" in handover.message
    (start,) = guest.starts
    assert "--share" not in start and start[2] == "ann"
    (admin,) = events(world, "fileshare-unavailable")
    assert admin[0] == "error" and "does not answer" in admin[1]
    (told,) = [m for m in messages_for(world.ctx, "ann") if m.kind == "folders-local"]
    assert handover.desktop is not None and handover.desktop in told.message
    # The portal shows it: the user's messages through the API.
    portal = world.client(world.user("ann", groups=("staff",))).get("/api/v1/messages")
    assert portal.status_code == 200
    assert any(m["severity"] == "warning" and "are not redirected" in m["message"]
               and m["desktop"] == handover.desktop for m in portal.json()), portal.text
    # Logoff with the server still down: the recycle goes on; the revocation (a password
    # database write, no server needed) still happens.
    assert handover.desktop_id is not None
    log_off_and_recycle(world, handover.desktop_id)


def test_a_guest_that_cannot_mount_gets_local_folders_and_the_password_is_revoked(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    guest.guest_cannot_mount = True
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready" and "local folders" in handover.message
    (admin,) = events(world, "fileshare-unavailable")
    assert "could not mount the share (could not mount: Host is down)" in admin[1]
    share = account_for(samba.layout, uid_of(world, "ann"))
    pdb = subprocess.run(["pdbedit", "-s", str(samba.layout.config), "-v", "-u", share],
                         capture_output=True, text=True, check=False)
    assert "Account Flags:        [DU" in pdb.stdout, pdb.stdout  # disabled at once


def test_redirect_folders_are_a_checked_pool_setting(world: BrokerWorld) -> None:
    admin = PoolAdmin(world.ctx)
    view = admin.update("lab", {"redirect_folders": "Documents, Music,Documents"})
    assert view.redirect_folders == ("Documents", "Music")
    for bad in ("../etc", ".ssh", "a/b", "x" * 65):
        with pytest.raises(InvalidInput, match="redirected folder"):
            admin.update("lab", {"redirect_folders": [bad]})
    with pytest.raises(InvalidInput, match="Music cannot be both kept out of profiles and "
                       "redirected"):
        admin.update("lab", {"profile_exclusions": ["Music"]})
    assert admin.update("lab", {"redirect_folders": ""}).redirect_folders == ()
    # The API: the same checks, a clear answer naming the field.
    api = world.client(world.user("root-admin", admin=True))
    for bad, status in (("../etc", 422), ("a/b", 422), (".ssh", 422), ("Docs..old", 400)):
        refused = api.patch("/api/v1/admin/pools/lab", json={"redirect_folders": [bad]})
        assert refused.status_code == status and "redirect" in refused.text, refused.text
    ok = api.patch("/api/v1/admin/pools/lab", json={"redirect_folders": ["Documents", "Music"]})
    assert ok.status_code == 200 and ok.json()["redirect_folders"] == ["Documents", "Music"]


def test_the_real_session_hooks_share_code_parses_and_refuses_bad_options() -> None:
    for shell in ("sh", "bash"):
        checked = subprocess.run([shell, "-n", str(HOOK_FILE)], capture_output=True,
                                 text=True, check=False)
        assert checked.returncode == 0, checked.stderr
    bad = subprocess.run(["sh", str(HOOK_FILE), "start", "--share", "//h/x;rm", "--share-port",
                          "445", "--share-credentials", "/run/deskpool-creds/share-ann",
                          "ann", "10000", "Ann"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "not a share" in bad.stderr
    bad = subprocess.run(["sh", str(HOOK_FILE), "start", "--share", "//h/x", "--redirect",
                          "../etc", "ann", "10000", "Ann"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "not a folder of the home" in bad.stderr
    bad = subprocess.run(["sh", str(HOOK_FILE), "start", "--share", "//h/x", "--share-port",
                          "445", "--share-credentials", "/etc/shadow", "ann", "10000", "Ann"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "must be /run/deskpool-creds/share-ann" in bad.stderr
    # unshare with nothing mounted (this host): nothing to do, and it says so by success.
    done = subprocess.run(["sh", str(HOOK_FILE), "unshare", "deskpool-nobody"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_real_session_hook_mounts_a_share_where_the_kernel_can(
        samba: SambaForTests) -> None:
    if shutil.which("mount.cifs", path="/usr/sbin:/sbin") is None:
        pytest.skip("mount.cifs is missing (Debian package cifs-utils)")
    if "cifs" not in Path("/proc/filesystems").read_text():
        if shutil.which("modprobe", path="/usr/sbin:/sbin"):
            subprocess.run(["modprobe", "cifs"], capture_output=True, check=False)
        if "cifs" not in Path("/proc/filesystems").read_text():
            pytest.skip("this kernel has no cifs filesystem (mount -t cifs: No such device); "
                        "the hook's mount runs in tests/realvm only")
    pytest.skip("a cifs-capable kernel: run the hook's mount_share in a realvm test")


def test_the_cli_sets_the_folders_and_shows_each_share_against_its_quota(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    lay = samba.layout
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(world.ctx.settings.data_dir),
           "DESKPOOL_CONFIG": "", "DESKPOOL_FILESHARE_DIR": str(lay.state_dir),
           "DESKPOOL_FILESHARE_ROOT": str(lay.share_root),
           "DESKPOOL_FILESHARE_PORT": str(lay.port),
           "DESKPOOL_FILESHARE_QUOTA_MIB": str(lay.quota_mib),
           "DESKPOOL_FILESHARE_ACCOUNT_PREFIX": lay.account_prefix}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DESKPOOL), *args], capture_output=True, text=True,
                              env=env, check=False, timeout=120)

    updated = cli("pool", "update", "lab", "--redirect-folders", "Documents,Music")
    assert updated.returncode == 0, updated.stderr
    assert "folders on the file share: Documents, Music" in updated.stdout
    handover = Broker(world.ctx).connect(ANN, "lab")
    share, _user, _pw = guest.mounted[handover.hostname or ""]
    (lay.share_root / share / "Documents" / "big.bin").write_bytes(os.urandom(9 << 20))
    status = cli("fileshare", "status")
    assert status.returncode == 0, status.stderr
    assert "answers" in status.stdout and share in status.stdout and "full" in status.stdout
    samba.kill()
    down = cli("fileshare", "status")
    assert down.returncode == 1 and "does not answer" in down.stdout


def test_a_second_concurrent_session_keeps_its_share_when_the_first_logs_off(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    world.pool("lab2", spare=1, max_size=1, redirect_folders=("Documents",))
    EntitlementService(world.ctx).grant("lab2", "group", "staff")
    world.fill(passes=2)
    first = Broker(world.ctx).connect(ANN, "lab")
    second = Broker(world.ctx).connect(ANN, "lab2")
    share, user, pw1 = guest.mounted[first.hostname or ""]
    _share, _user, pw2 = guest.mounted[second.hostname or ""]
    assert pw1 != pw2
    # Issuing the second session's password retired the first's for new logons.
    assert samba.smbclient(share, user, pw1, "ls").returncode != 0
    assert first.desktop_id is not None and second.desktop_id is not None
    log_off_and_recycle(world, first.desktop_id)
    assert samba.smbclient(share, user, pw2, "ls").returncode == 0  # still the session's
    assert any(f"still open on {second.desktop}" in m
               for _s, m in events(world, "fileshare-closed"))
    log_off_and_recycle(world, second.desktop_id)
    assert samba.smbclient(share, user, pw2, "ls").returncode != 0


def test_an_image_without_the_credentials_directory_gets_local_folders(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests,
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = GuestAgent.write_file

    def write_file(agent: GuestAgent, path: str, data: bytes) -> None:
        if path.startswith("/run/deskpool-creds/"):
            raise DriverError(f"guest-file-open {path}: No such file or directory")
        original(agent, path, data)

    monkeypatch.setattr(GuestAgent, "write_file", write_file)
    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.status == "ready" and "local folders" in handover.message
    assert "--share" not in guest.starts[-1]
    (admin,) = events(world, "fileshare-unavailable")
    assert "did not take the share's credentials" in admin[1]
    share = account_for(samba.layout, uid_of(world, "ann"))
    pdb = subprocess.run(["pdbedit", "-s", str(samba.layout.config), "-v", "-u", share],
                         capture_output=True, text=True, check=False)
    assert "Account Flags:        [DU" in pdb.stdout, pdb.stdout  # revoked at once


def test_a_session_that_does_not_start_leaves_no_password_working(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    guest.session_starts = False
    with pytest.raises(Unavailable, match="did not start in time"):
        Broker(world.ctx).connect(ANN, "lab")
    assert len(guest.starts) == len(guest.mounted) == 2  # both tried, each given a password
    for share, user, password in guest.mounted.values():
        refused = samba.smbclient(share, user, password, "ls")
        assert refused.returncode != 0 and "LOGON_FAILURE" in refused.stdout + refused.stderr


def test_a_failed_second_hand_over_leaves_the_first_sessions_share_alone(
        world: BrokerWorld, guest: GuestShares, samba: SambaForTests) -> None:
    world.pool("lab2", spare=2, max_size=2, redirect_folders=("Documents",))
    EntitlementService(world.ctx).grant("lab2", "group", "staff")
    world.fill(passes=2)
    first = Broker(world.ctx).connect(ANN, "lab")
    share, user, password = guest.mounted[first.hostname or ""]
    held = subprocess.Popen(  # the first desktop's mount: one authenticated connection
        ["smbclient", f"//127.0.0.1/{share}", "-p", str(samba.layout.port), "-U", user,
         "-m", "SMB3"], env={"PATH": "/usr/bin:/bin", "PASSWD": password},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    time.sleep(1.5)
    guest.session_starts = False
    with pytest.raises(Unavailable):
        Broker(world.ctx).connect(ANN, "lab2")
    out, _ = held.communicate("ls\n", timeout=30)
    assert "blocks available" in out and "DISCONNECTED" not in out, out
    with world.ctx.uow(read_only=True) as uow:
        assert uow.desktops.share_holders("ann") == [first.desktop]
