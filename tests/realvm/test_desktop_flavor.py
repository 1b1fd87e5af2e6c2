"""The desktop image flavor on a real VM: a linked clone of it, with the memory its recipe
records, boots to LightDM's graphical greeter, not a text console.

Checked from outside (libvirt's screenshot of the VM's screen: a graphical resolution and
anti-aliased drawing) and from inside (through the guest agent: LightDM and Xorg running on
the graphical target, the modules later work needs still loadable)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from deskpool.config import Settings
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.images.recipe import Flavor
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from tests.realvm.conftest import remove_pool_of
from tests.realvm.screens import Screen, analyse, png_size, save_png, screenshot

pytestmark = pytest.mark.realvm
TEMPLATE = "xfce"
GREETER_TIMEOUT_S = 240.0  # ~1 min measured under TCG on an idle 2-CPU machine
XRDP_TIMEOUT_S = 240.0  # its keys are made at idle priority, after the greeter


@dataclass
class Booted:
    ctx: ServiceContext
    desktop: DesktopView
    created_s: float  # time.monotonic() when the create call began
    ready_s: float  # when the guest agent answered and the identity was applied


@pytest.fixture(scope="module")
def booted(desktop_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Booted]:
    """One linked clone of the desktop image, booted through deskpool, for this module."""
    root = tmp_path_factory.mktemp("desktop-flavor")
    ctx = ServiceContext(Settings(data_dir=root / "data"))
    try:
        HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
        TemplateService(ctx).publish(
            TEMPLATE, ImageFiles.from_guest_image(desktop_image),
            recipe_hash=desktop_image.recipe_hash, memory_mib=desktop_image.memory_mib,
            arch="x86_64")
        service = DesktopService(ctx)
        started = time.monotonic()
        desktop = service.create(TEMPLATE, pattern="gfx-{n:02}", wait_ready=False)
        try:
            service.wait_ready(desktop.id, timeout_s=GREETER_TIMEOUT_S)
            yield Booted(ctx, service.get(str(desktop.id)), started, time.monotonic())
        finally:
            service.delete(str(desktop.id))
    finally:
        ctx.close()
        remove_pool_of(root / "pool")


@pytest.fixture(scope="module")
def domain(booted: Booted) -> Iterator[libvirt.virDomain]:
    conn = libvirt.open("qemu:///system")
    try:
        yield conn.lookupByUUIDString(str(booted.desktop.id))
    finally:
        conn.close()


def _agent(booted: Booted) -> GuestAgent:
    return GuestAgent(booted.ctx.driver_for_name("local"), booted.desktop.id)


def test_the_desktop_image_is_its_own_flavor(desktop_image: GuestImage) -> None:
    assert desktop_image.flavor is Flavor.DESKTOP
    assert desktop_image.memory_mib == 1536
    size = desktop_image.disk.stat().st_size
    print(f"desktop image {desktop_image.recipe_hash[:12]}: {size / 2**20:.0f} MiB qcow2")


def test_the_vm_gets_the_memory_the_recipe_records(
    booted: Booted, domain: libvirt.virDomain
) -> None:
    assert booted.desktop.state == "ready", booted.desktop.last_error
    assert domain.maxMemory() == 1536 * 1024  # KiB


def test_it_boots_to_a_graphical_greeter(
    booted: Booted, domain: libvirt.virDomain, tmp_path_factory: pytest.TempPathFactory
) -> None:
    print(f"create -> guest agent and identity: {booted.ready_s - booted.created_s:.1f} s")
    deadline = booted.created_s + GREETER_TIMEOUT_S
    seen: list[tuple[float, int, int]] = []
    screen: Screen | None = None
    while True:
        mime, data = screenshot(domain)
        now = time.monotonic() - booted.created_s
        size = png_size(data) if "png" in mime else (0, 0)
        seen.append((round(now, 1), *size))
        # Decoding all pixels takes seconds in pure Python: only once the mode is graphical.
        if "png" not in mime or size[0] >= 800:
            screen = analyse(mime, data)
            if screen.is_graphical():
                break
        if time.monotonic() >= deadline:
            break
        time.sleep(3)
    shot = save_png(mime, data, tmp_path_factory.mktemp("screens") / "greeter.png")
    print(f"greeter screenshot: {shot} ({screen}); create -> greeter: {now:.1f} s")
    assert screen is not None and screen.is_graphical(), (
        f"no graphical greeter within {GREETER_TIMEOUT_S:.0f} s: last screen {screen}, "
        f"screenshot {shot}, screens seen (s, width, height): {seen}")


def test_lightdm_and_xorg_run_on_the_graphical_target(booted: Booted) -> None:
    agent = _agent(booted)
    code, target, _ = agent.exec_capture(["/usr/bin/systemctl", "get-default"])
    assert (code, target.strip()) == (0, "graphical.target")
    code, active, err = agent.exec_capture(
        ["/usr/bin/systemctl", "is-active", "display-manager.service", "lightdm.service"])
    assert code == 0 and active.split() == ["active", "active"], (active, err)
    for process in ("lightdm", "Xorg"):
        code, pids, _ = agent.exec_capture(["/usr/bin/pgrep", "-x", process])
        assert code == 0 and pids.split(), f"{process} is not running in the guest"
    code, _, _ = agent.exec_capture(["/usr/bin/pgrep", "-f", "lightdm-gtk-greeter"])
    assert code == 0, "the greeter is not running"
    # The GPU driver Xorg's modesetting driver drew with.
    code, _, err = agent.exec_capture(["/usr/bin/test", "-e", "/dev/dri/card0"])
    assert code == 0, err


def test_the_modules_later_work_needs_still_load(booted: Booted) -> None:
    code, out, err = _agent(booted).exec_capture(
        ["/usr/sbin/modprobe", "-a", "cifs", "overlay", "dm_crypt"], timeout_s=60)
    assert code == 0, (out, err)


def test_xrdp_runs_with_keys_of_its_own(booted: Booted) -> None:
    """The image's keys were dropped at build time: this desktop made its own, for its name.
    (Made while the CPU is otherwise idle: under TCG a minute or more after the greeter.)"""
    agent = _agent(booted)
    deadline = time.monotonic() + XRDP_TIMEOUT_S
    while True:
        code, active, err = agent.exec_capture(
            ["/usr/bin/systemctl", "is-active", "xrdp.service"], timeout_s=60)
        # Waiting for its keys ("inactive"), or starting ("activating").
        if active.strip() not in ("inactive", "activating") or time.monotonic() >= deadline:
            break
        time.sleep(5)
    print(f"create -> xrdp running: {time.monotonic() - booted.created_s:.1f} s")
    assert (code, active.strip()) == (0, "active"), err
    code, subject, err = agent.exec_capture(
        ["/usr/bin/openssl", "x509", "-noout", "-subject", "-in", "/etc/xrdp/cert.pem"])
    assert code == 0 and booted.desktop.hostname in subject, (subject, err)


def test_the_screenshot_decoder_round_trips(tmp_path: Path) -> None:
    """The helper itself, on a PNG it writes (no VM needed, but it lives with the tier)."""
    from tests.realvm.screens import decode_png, encode_png

    rgb = bytes((x * 7 + y) % 256 for y in range(30) for x in range(40 * 3))
    width, height, back = decode_png(encode_png(40, 30, rgb))
    assert (width, height, back) == (40, 30, rgb)
