"""An administrator's customization on a real guest: a template of the cloudinit flavor with
the admin's own cloud-init user data and a join hook that enrolls the desktop in the tests'
slapd with nslcd (installed in the image, off until the hook configures it), so directory
users resolve inside the guest with their uidNumber: the same uid deskpool gives their account.

One desktop, booted once. The guest reaches the host's slapd through QEMU's user-mode network,
where 10.0.2.2 is the host's loopback; the guest has no other network, so the hook installs
nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deskpool.broker.desktop_session import SessionStarter
from deskpool.broker.ldap_auth import LdapAuthenticator, LdapSettings
from deskpool.config import Settings
from deskpool.domain.models import Customization, PowerState
from deskpool.domain.states import DesktopState, transition
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.services.context import ServiceContext
from deskpool.services.customize import JOIN_MARKER_PATH
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.hosts import HostService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from tests.ldap_server import (
    BASE_DN,
    GROUPS_DN,
    PEOPLE_DN,
    POSIX_USERS,
    READER_DN,
    READER_PASSWORD,
    SlapdServer,
)
from tests.realvm.conftest import remove_pool_of

pytestmark = pytest.mark.realvm

TEMPLATE = "join-ci"
USER_DATA = """#cloud-config
write_files:
  - path: /etc/deskpool-admin.txt
    content: |
      written by the admin's cloud-config
runcmd:
  - [sh, -c, 'echo "runcmd ran on $(hostname)" >> /var/tmp/admin-runcmd']
"""
# Counts its runs, keeps its environment, and enrolls the desktop in the directory with nslcd.
JOIN_HOOK = """#!/bin/sh
set -eu
mkdir -p /var/lib/join-test
runs=$(cat /var/lib/join-test/runs 2>/dev/null || echo 0)
echo $((runs + 1)) >/var/lib/join-test/runs
env | grep '^DESKPOOL_' | sort >/var/lib/join-test/env
cat >/etc/nslcd.conf <<EOF
uid nslcd
gid nslcd
uri {uri}
base {base}
binddn {binddn}
bindpw {bindpw}
EOF
chown root:nslcd /etc/nslcd.conf
chmod 0640 /etc/nslcd.conf
sed -i -E 's/^(passwd|group):.*/& ldap/' /etc/nsswitch.conf
systemctl enable --now nslcd.service
echo "enrolled $DESKPOOL_HOSTNAME in {uri}"
"""


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    with SlapdServer() as server:
        yield server


@pytest.fixture(scope="module")
def ctx(cloudinit_image: GuestImage, slapd: SlapdServer,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceContext]:
    root = tmp_path_factory.mktemp("join")
    context = ServiceContext(Settings(data_dir=root / "data"))
    HostService(context).add("local", "qemu:///system", storage_dir=root / "pool")
    hook = JOIN_HOOK.format(uri=f"ldap://10.0.2.2:{slapd.port}/", base=BASE_DN,
                            binddn=READER_DN, bindpw=READER_PASSWORD)
    TemplateService(context).publish(
        TEMPLATE, ImageFiles.from_guest_image(cloudinit_image),
        customization=Customization.CLOUD_INIT, memory_mib=cloudinit_image.memory_mib,
        recipe_hash=cloudinit_image.recipe_hash, user_data=USER_DATA, join_hook=hook)
    yield context
    context.close()
    remove_pool_of(root / "pool")


@pytest.fixture(scope="module")
def desktop(ctx: ServiceContext) -> Iterator[DesktopView]:
    service = DesktopService(ctx)
    started = time.monotonic()
    try:
        made = service.create(
            TEMPLATE, pattern="join-{n:02}", ready_timeout_s=300,
            progress=lambda step: print(f"{time.monotonic() - started:6.1f} s  {step}"))
        print(f"cloud-init desktop ready (user data and join hook done) in "
              f"{time.monotonic() - started:.0f} s")
        yield made
    finally:
        for each in service.list():
            service.delete(str(each.id))


def _agent(ctx: ServiceContext, desktop: DesktopView) -> GuestAgent:
    return GuestAgent(ctx.driver_for_name("local"), desktop.id)


def _run(agent: GuestAgent, script: str) -> str:
    code, out, err = agent.exec_capture(["/bin/sh", "-c", script], timeout_s=60)
    assert code == 0, f"{script!r} failed ({code}): {out} {err}"
    return out


def test_the_admins_user_data_ran_and_the_hostname_is_deskpools(
        ctx: ServiceContext, desktop: DesktopView) -> None:
    assert desktop.state == "ready", desktop.last_error
    agent = _agent(ctx, desktop)
    assert agent.host_name() == desktop.hostname
    assert agent.read_file("/etc/machine-id").decode().strip() == desktop.machine_id
    assert agent.read_file("/etc/deskpool-admin.txt").decode() == (
        "written by the admin's cloud-config\n")
    assert agent.read_file("/var/tmp/admin-runcmd").decode() == (
        f"runcmd ran on {desktop.hostname}\n")


def test_the_join_hook_ran_once_with_the_desktops_identity(
        ctx: ServiceContext, desktop: DesktopView) -> None:
    agent = _agent(ctx, desktop)
    assert agent.read_file("/var/lib/join-test/runs").decode().strip() == "1"
    env = dict(line.split("=", 1) for line in
               agent.read_file("/var/lib/join-test/env").decode().splitlines())
    assert env["DESKPOOL_HOSTNAME"] == desktop.hostname
    assert env["DESKPOOL_DESKTOP_NAME"] == desktop.name
    assert env["DESKPOOL_DESKTOP_ID"] == str(desktop.id)
    assert env["DESKPOOL_MACHINE_ID"] == desktop.machine_id
    assert env["DESKPOOL_MAC"] == desktop.mac
    assert (env["DESKPOOL_TEMPLATE"], env["DESKPOOL_TEMPLATE_VERSION"]) == (TEMPLATE, "1")
    assert (env["DESKPOOL_POOL"], env["DESKPOOL_IDENTITY_METHOD"]) == ("", "cloud-init")
    assert f"desktop_id={desktop.id}" in agent.read_file(JOIN_MARKER_PATH).decode()
    ran = [e for e in recent_events(ctx) if e.kind == "join-hook-ran"]
    assert len(ran) == 1 and ran[0].desktop == desktop.name
    assert f"enrolled {desktop.hostname} in ldap://10.0.2.2:" in ran[0].message


def test_a_second_make_ready_does_not_run_the_hook_again(
        ctx: ServiceContext, desktop: DesktopView) -> None:
    """The repair path (error -> customizing -> make_ready) on the same disk: the marker
    the hook left says it ran, so it is not run twice."""
    with ctx.uow() as uow:
        transition(uow.desktops, desktop.id, DesktopState.READY, DesktopState.ERROR,
                   last_error="test: pretend it failed")
        transition(uow.desktops, desktop.id, DesktopState.ERROR, DesktopState.CUSTOMIZING)
        uow.commit()
    DesktopService(ctx).factory.make_ready(desktop.id, timeout_s=120)
    assert DesktopService(ctx).get(str(desktop.id)).state == "ready"
    agent = _agent(ctx, desktop)
    assert agent.read_file("/var/lib/join-test/runs").decode().strip() == "1"
    assert len([e for e in recent_events(ctx) if e.kind == "join-hook-ran"]) == 1


def test_a_reboot_runs_neither_the_hook_nor_the_admins_runcmd_again(
        ctx: ServiceContext, desktop: DesktopView) -> None:
    """Shut down and made ready again (booted, identity confirmed, cloud-init waited for):
    cloud-init's per-instance runcmd and the join hook both stay at one run."""
    driver = ctx.driver_for_name("local")
    driver.stop_vm(desktop.id)
    deadline = time.monotonic() + 120
    while driver.get_vm(desktop.id).power_state is not PowerState.SHUTOFF:
        if time.monotonic() > deadline:
            driver.stop_vm(desktop.id, force=True)
        time.sleep(1)
    with ctx.uow() as uow:
        transition(uow.desktops, desktop.id, DesktopState.READY, DesktopState.ERROR,
                   last_error="test: powered off")
        transition(uow.desktops, desktop.id, DesktopState.ERROR, DesktopState.CUSTOMIZING)
        uow.commit()
    started = time.monotonic()
    DesktopService(ctx).factory.make_ready(desktop.id, timeout_s=300)
    print(f"rebooted cloud-init desktop ready again in {time.monotonic() - started:.0f} s")
    agent = _agent(ctx, desktop)
    print(_run(agent, "systemd-analyze; systemd-analyze blame | head -n 8; "
                      "cloud-init analyze show 2>/dev/null | grep -E 'Finished stage|Total'"))
    assert agent.host_name() == desktop.hostname
    assert agent.read_file("/var/lib/join-test/runs").decode().strip() == "1"
    assert agent.read_file("/var/tmp/admin-runcmd").decode() == (
        f"runcmd ran on {desktop.hostname}\n")


def test_directory_users_resolve_in_the_guest_with_deskpools_uid(
        ctx: ServiceContext, desktop: DesktopView, slapd: SlapdServer) -> None:
    agent = _agent(ctx, desktop)
    code, out, _err = agent.exec_capture(["getent", "passwd", "erin"], timeout_s=60)
    if code != 0:  # what the guest's name service looked like, to say why
        pytest.fail(f"getent passwd erin failed ({code}): " + _run(
            agent, "grep -E '^(passwd|group):' /etc/nsswitch.conf; systemctl is-active nslcd;"
                   " journalctl -b -u nslcd --no-pager | tail -n 15; ip -4 addr show eth0;"
                   " ip route"))
    entry = out.strip().split(":")
    uid, gid = POSIX_USERS["erin"]
    # The password field is whatever nslcd shows for an unreadable userPassword.
    assert [entry[0], *entry[2:]] == ["erin", str(uid), str(gid), "Erin Posix", "/home/erin",
                                      "/bin/bash"], entry
    # The account deskpool makes for erin at hand-over has the same uid.
    identity = LdapAuthenticator(LdapSettings(
        url=slapd.url, bind_dn=READER_DN, bind_password=READER_PASSWORD,
        user_base=PEOPLE_DN, group_base=GROUPS_DN, timeout_s=2)).authenticate("erin", "erin-pw")
    assert identity is not None and (identity.uid, identity.gid) == (uid, gid)
    assert SessionStarter(ctx).account_for(identity) == ("erin", uid)

