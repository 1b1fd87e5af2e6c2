"""Real-VM tier: QEMU guests booted by libvirt qemu:///system from the images the project builds.

Each image flavor is built at most once per run, and only by a run that asks for it
(``guest_image``: console, ``desktop_image``: desktop, ``cloudinit_image``: cloudinit), cached
by recipe hash under the default data directory, so a second run reuses it; everything else
(database, template copies, storage pool) lives in a temporary directory of the test session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.images.builder import GuestImage, build_guest_image
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.conftest import qemu_system_unreachable_reason, skip_or_fail_without_real_vms

TEMPLATE = "realvm"


def built_image(flavor: Flavor) -> GuestImage:
    """The project's image of ``flavor``, built if the cache lacks it (skips, or fails in CI,
    where qemu:///system is out of reach)."""
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    return build_guest_image(Settings().image_cache_dir, recipe_for(flavor))


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return built_image(Flavor.CONSOLE)


@pytest.fixture(scope="session")
def desktop_image() -> GuestImage:
    """The desktop flavor (Xorg, LightDM, Xfce), for tests that need a graphical guest. Its
    VMs need ``desktop_image.memory_mib`` (1536 MiB)."""
    return built_image(Flavor.DESKTOP)


@pytest.fixture(scope="session")
def cloudinit_image() -> GuestImage:
    """The cloudinit flavor (the console image with cloud-init and a disabled nslcd), for
    tests of templates customized by cloud-init user data and a join hook."""
    return built_image(Flavor.CLOUDINIT)


@pytest.fixture(scope="session")
def real_ctx(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceContext]:
    root = tmp_path_factory.mktemp("realvm")
    ctx = ServiceContext(Settings(data_dir=root / "data"))
    HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
    TemplateService(ctx).publish(TEMPLATE, ImageFiles.from_guest_image(guest_image),
                                 recipe_hash=guest_image.recipe_hash)
    yield ctx
    ctx.close()
    remove_pool_of(root / "pool")


def settle(reconciler: Reconciler, done: Callable[[], bool], what: str,
           timeout_s: float = 900) -> None:
    """Run reconciler passes until ``done()`` (a guest boots in about a minute under TCG on a
    quiet machine, several times that when other tests load it: no timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        reconciler.run_pass()
        time.sleep(0.5)


def delete_every_desktop(ctx: ServiceContext) -> None:
    """A multi-host test's cleanup: every desktop deleted where its host still answers (a
    host a test took down is cleaned up with its daemon)."""
    for desktop in DesktopService(ctx).list():
        try:
            DesktopService(ctx).delete(desktop.name)
        except Exception as exc:
            print(f"cleanup of {desktop.name}: {exc}")


def remove_pool_of(storage_dir: Path) -> None:
    """The libvirt storage pool a test made for its temporary directory, once it is done."""
    from deskpool.drivers.libvirt import forget_storage_pool

    forget_storage_pool(storage_dir)


@pytest.fixture(scope="session")
def storage_dir(real_ctx: ServiceContext) -> Path:
    (host,) = HostService(real_ctx).list()
    assert host.storage_dir is not None
    return Path(host.storage_dir)
