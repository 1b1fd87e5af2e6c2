"""A stateful desktop with a user layer, on a real VM (issue 14, item 3's desktop side).

The pool gives each desktop a user layer disk (``user_layer_mib``). The console-flavor
guest's initramfs lays that disk's current generation over the template's root, so what the
user changes in the system lands in the layer as files, not in the desktop's root overlay:
a file in ``/etc``, a tool in ``/opt``, a note in a home, a deleted template file (a
whiteout). Shown from the guest (the root is an overlay, the changes are there after a cold
boot) and from the host with the VM off, reading the disks with ``debugfs`` (no mount): the
layer's ``current/upper`` holds each change, the root overlay none, the template's disk is
unchanged.

Then a template patch (``layer_world.patched_image``: a package upgraded, base-files'
``/etc/issue`` changed) rolled out while the user works: at their logoff the desktop is
rebased in its guest onto the new version, and the user finds their own package, their
files, the patched package at its new version, ``dpkg --audit`` clean, and the conflicting
``/etc/issue`` with their copy kept beside it, reported to them and to the administrator. A
rebase that cannot be done (a corrupt manifest) leaves the desktop on its old version, with
a clear event, and the user's files untouched. Deleting the desktop removes its layer disk.

The module has its own template (a rollout must not reach other modules' pools) and one
desktop all along: about five boots under TCG.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain.models import PowerState
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver, layer_volume_name, root_volume_name
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.factory import version_volume_names
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.user_layers import UserLayerViews
from tests.pool_users import PoolUsers
from tests.realvm.conftest import settle
from tests.realvm.layer_world import (
    PATCHED_PACKAGE,
    USER_PACKAGE,
    patched_image,
    user_deb,
)

pytestmark = pytest.mark.realvm
POOL = "layered"
TEMPLATE = "layered-tpl"
READY_TIMEOUT_S = 300
CHANGES = ("mkdir -p /opt/tool/bin && printf '#!/bin/sh\\necho tool\\n' > /opt/tool/bin/tool"
           " && chmod 755 /opt/tool/bin/tool"
           " && echo 'setting=users-own' > /etc/deskpool-user.conf"
           " && echo 'a note' > /root/notes.txt"
           " && rm /etc/issue && sync")


def _desktops(ctx: ServiceContext) -> list[tuple[uuid.UUID, str]]:
    with ctx.uow(read_only=True) as uow:
        (pool_id,) = [p.id for p in uow.pools.list() if p.name == POOL]
        return [(d.id, d.state) for d in uow.desktops.summaries(pool_id=pool_id)]


@pytest.fixture(scope="module")
def layered_pool(real_ctx: ServiceContext, guest_image: GuestImage) -> Iterator[Reconciler]:
    TemplateService(real_ctx).publish(TEMPLATE, ImageFiles.from_guest_image(guest_image),
                                      recipe_hash=guest_image.recipe_hash)
    PoolService(real_ctx).create(PoolSpec(
        POOL, TEMPLATE, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
        on_logout=OnLogout.RECYCLE_AS_IS, spare=1, max_size=1, user_layer_mib=128,
        naming_pattern="layered-{n:02}"))
    PoolUsers(real_ctx, POOL).entitle("bob")
    reconciler = Reconciler(real_ctx, workers=2, ready_timeout_s=READY_TIMEOUT_S)
    yield reconciler
    PoolService(real_ctx).resize(POOL, min_size=0, spare=0)
    for desktop_id, state in _desktops(real_ctx):
        if state != "retired":
            DesktopService(real_ctx).delete(str(desktop_id))
    reconciler.run_pass()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _debugfs(driver: HypervisorDriver, volume: str, tmp: Path, *requests: str) -> str:
    """``debugfs`` requests against a volume's file system, read from a raw copy (the
    volume's backing chain included): the host's view, with nothing mounted."""
    raw = tmp / f"{volume}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", driver.volume_info(volume).path,
                    str(raw)], check=True, capture_output=True)
    script = tmp / "requests"
    script.write_text("\n".join(requests) + "\n")  # -R takes one request, -f many
    done = subprocess.run(["debugfs", "-f", str(script), str(raw)], capture_output=True,
                          text=True, check=True)
    raw.unlink()
    return done.stdout + done.stderr


def _power_off(driver: HypervisorDriver, vm_id: uuid.UUID) -> None:
    driver.stop_vm(vm_id)  # the guest shuts down: its file systems are clean
    deadline = time.monotonic() + 300
    while driver.get_vm(vm_id).power_state is not PowerState.SHUTOFF:
        assert time.monotonic() < deadline, "the guest did not shut down"
        time.sleep(1)


def test_a_users_changes_to_the_system_land_in_their_layer_and_survive_a_boot(
    real_ctx: ServiceContext, layered_pool: Reconciler, tmp_path: Path
) -> None:
    settle(layered_pool, lambda: any(s == "ready" for _, s in _desktops(real_ctx)),
           "the layered desktop")
    bob = PoolUsers(real_ctx, POOL, ready_timeout_s=READY_TIMEOUT_S)
    desktop_id = bob.connect("bob")
    driver = real_ctx.driver_for_name("local")
    agent = GuestAgent(driver, desktop_id)
    code, out, err = agent.exec_capture(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/"])
    assert code == 0, err
    assert out.split()[0] == "overlay" and "lowerdir=/run/deskpool/base" in out
    code, _, err = agent.exec_capture(["sh", "-c", CHANGES])
    assert code == 0, err
    with real_ctx.uow(read_only=True) as uow:
        master = driver.volume_info(version_volume_names(
            uow.desktops.get(desktop_id).template_version)[0]).path
    master_sha256 = _sha256(master)

    _power_off(driver, desktop_id)
    layer = _debugfs(driver, layer_volume_name(desktop_id), tmp_path,
                     "cat /current/upper/etc/deskpool-user.conf",
                     "cat /current/upper/opt/tool/bin/tool",
                     "cat /current/upper/root/notes.txt",
                     "stat /current/upper/etc/issue")
    assert "setting=users-own" in layer and "echo tool" in layer and "a note" in layer
    assert "Type: character special" in layer  # the deleted /etc/issue: a whiteout
    root = _debugfs(driver, root_volume_name(desktop_id), tmp_path,
                    "stat /etc/deskpool-user.conf", "stat /opt/tool", "cat /etc/issue")
    assert root.count("File not found") == 2  # none of it in the desktop's root overlay
    assert "deskpool" in root  # and the template's /etc/issue is still there under the layer
    assert _sha256(master) == master_sha256

    # A cold boot: the same layer over the same root, the user's changes all there.
    driver.start_vm(desktop_id)
    agent.wait_until_ready(READY_TIMEOUT_S)
    code, out, err = agent.exec_capture(
        ["sh", "-c", "cat /etc/deskpool-user.conf; /opt/tool/bin/tool; cat /root/notes.txt; "
                     "test -e /etc/issue && echo issue-is-back || echo issue-gone"])
    assert code == 0, err
    assert out.split("\n")[:4] == ["setting=users-own", "tool", "a note", "issue-gone"]
    code, _, err = agent.exec_capture(["sh", "-c", "echo 'users own issue' > /etc/issue"])
    assert code == 0, err


def _the_desktop(ctx: ServiceContext) -> uuid.UUID:
    (desktop_id,) = [d for d, state in _desktops(ctx) if state != "retired"]
    return desktop_id


def _version_of(ctx: ServiceContext, desktop_id: uuid.UUID) -> int:
    with ctx.uow(read_only=True) as uow:
        return uow.desktops.get(desktop_id).template_version.number


def test_a_patched_template_reaches_the_users_desktop_with_their_changes_kept(
    real_ctx: ServiceContext, layered_pool: Reconciler, guest_image: GuestImage,
    tmp_path: Path
) -> None:
    bob = PoolUsers(real_ctx, POOL, ready_timeout_s=READY_TIMEOUT_S)
    desktop_id = bob.connect("bob")  # the desktop of the test above, with his changes
    driver = real_ctx.driver_for_name("local")
    agent = GuestAgent(driver, desktop_id)
    agent.write_file("/root/tool.deb", user_deb(tmp_path).read_bytes())
    code, out, err = agent.exec_capture(["dpkg", "-i", "/root/tool.deb"])
    assert code == 0, out + err

    # The administrator patches the template while bob works: his desktop waits for him.
    image, patched_version = patched_image(guest_image.disk, tmp_path)
    TemplateService(real_ctx).publish(TEMPLATE, ImageFiles(
        disk=image, kernel=guest_image.kernel, initrd=guest_image.initrd,
        cmdline=guest_image.cmdline), recipe_hash=guest_image.recipe_hash)
    assert PoolService(real_ctx).rollout(POOL).version == 2
    layered_pool.run_pass()
    assert _version_of(real_ctx, desktop_id) == 1 and agent.read_file("/opt/tool/bin/tool")

    bob.log_off(desktop_id, "bob")  # the rebase: his layer onto version 2, in the guest
    settle(layered_pool, lambda: _version_of(real_ctx, desktop_id) == 2
           and dict(_desktops(real_ctx)).get(desktop_id) == "ready", "the rebase")
    assert bob.connect("bob") == desktop_id  # the same desktop, his own
    code, out, err = agent.exec_capture(["sh", "-c", (
        f"dpkg-query -W -f '${{Package}}=${{Version}}\\n' {USER_PACKAGE} {PATCHED_PACKAGE}"
        " && dpkg --audit && echo audit-clean"
        f" && {USER_PACKAGE} && cat /etc/deskpool-user.conf /root/notes.txt /etc/issue"
        " /etc/issue.deskpool-conflict /etc/deskpool-release && /opt/tool/bin/tool")])
    assert code == 0, out + err
    lines = out.split("\n")
    assert sorted(lines[:2]) == sorted([f"{USER_PACKAGE}=1.0",
                                        f"{PATCHED_PACKAGE}={patched_version}"])
    assert lines[2:] == ["audit-clean",
        "user-tool-works", "setting=users-own", "a note",
        "deskpool desktop, patched \\n (\\l)",  # the patch wins on base-files' file...
        "users own issue",  # ... and bob's copy is beside it
        "deskpool template, version 2", "tool", ""]

    views = UserLayerViews(real_ctx)
    layer = views.desktop_layer(desktop_id)
    assert layer.last_rebase is not None and layer.last_rebase.outcome == "rebased"
    assert [(c.path, c.user_copy) for c in layer.last_rebase.conflicts] == [
        ("/etc/issue", "/etc/issue.deskpool-conflict")]
    told = views.user_conflicts("bob", desktop_id).last_rebase
    assert told is not None and [c.path for c in told.conflicts] == ["/etc/issue"]
    pool = views.pool_layers(POOL)
    assert (pool.rebased, pool.failed, pool.conflicts) == (1, 0, 1)
    spec = driver.get_vm(desktop_id)
    assert spec.power_state is PowerState.RUNNING


def test_a_rebase_that_cannot_be_done_keeps_the_desktop_on_its_version_untouched(
    real_ctx: ServiceContext, layered_pool: Reconciler, guest_image: GuestImage
) -> None:
    bob = PoolUsers(real_ctx, POOL, ready_timeout_s=READY_TIMEOUT_S)
    desktop_id = bob.connect("bob")
    driver = real_ctx.driver_for_name("local")
    agent = GuestAgent(driver, desktop_id)
    # The layer's manifest corrupted (its checksum no longer matches): no rebase may trust it.
    code, _, err = agent.exec_capture(["sh", "-c", (
        "cd /run/deskpool/layer/current/.deskpool && "
        "sed -i 's/\"checksum\": \"./\"checksum\": \"X/' manifest.json && sync")])
    assert code == 0, err
    TemplateService(real_ctx).publish(TEMPLATE, ImageFiles.from_guest_image(guest_image),
                                      recipe_hash=guest_image.recipe_hash)
    assert PoolService(real_ctx).rollout(POOL).version == 3
    bob.log_off(desktop_id, "bob")
    views = UserLayerViews(real_ctx)
    settle(layered_pool, lambda: (r := views.desktop_layer(desktop_id).last_rebase) is not None
           and r.new_version == 3 and dict(_desktops(real_ctx)).get(desktop_id) == "ready",
           "the failed rebase and the desktop back on version 2")
    failed = views.desktop_layer(desktop_id).last_rebase
    assert failed is not None and failed.outcome == "failed"
    assert failed.error is not None and "manifest" in failed.error
    assert _version_of(real_ctx, desktop_id) == 2
    assert bob.connect("bob") == desktop_id
    code, out, err = agent.exec_capture(["sh", "-c", "cat /etc/deskpool-user.conf /root/notes.txt"
                                         f" && {USER_PACKAGE}"])
    assert code == 0, err
    assert out.split() == ["setting=users-own", "a", "note", "user-tool-works"]


def test_deleting_the_desktop_removes_its_layer(
    real_ctx: ServiceContext, layered_pool: Reconciler
) -> None:
    desktop_id = _the_desktop(real_ctx)
    driver = real_ctx.driver_for_name("local")
    # The desktop deleted (the administrator's own act): its layer goes with it.
    PoolService(real_ctx).resize(POOL, min_size=0, spare=0)  # and no new one booted
    DesktopService(real_ctx).delete(str(desktop_id))
    layered_pool.run_pass()
    settle(layered_pool, lambda: all(d != desktop_id for d, _ in _desktops(real_ctx)),
           "the deletion", timeout_s=300)
    assert layer_volume_name(desktop_id) not in driver.list_volumes()
