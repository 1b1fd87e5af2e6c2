"""The desktop factory end to end on the fake driver and libvirt's test:/// driver: hosts,
template versions, linked and full clones, identity confirmation, deletion and bad input."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.domain.errors import (
    Conflict,
    HypervisorUnreachable,
    InvalidInput,
    NotFound,
    TemplateUnusable,
)
from deskpool.domain.models import CloneMode, Customization
from deskpool.domain.states import DesktopState
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.templates import ImageFiles, TemplateService


def make_qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    yield context
    context.close()
    forget_fake_hosts()


@pytest.fixture()
def fake_host(ctx: ServiceContext) -> FakeDriver:
    HostService(ctx).add("h1", "fake://h1")
    driver = open_driver("fake://h1")
    assert isinstance(driver, FakeDriver)
    return driver


@pytest.fixture()
def template(ctx: ServiceContext, tmp_path: Path) -> str:
    TemplateService(ctx).publish("golden", ImageFiles(disk=make_qcow2(tmp_path / "g.qcow2")))
    return "golden"


def test_linked_clone_becomes_ready_with_its_own_identity(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    desktops = DesktopService(ctx)
    first = desktops.create(template, pattern="lab-{n:03}")
    second = desktops.create(template, pattern="lab-{n:03}")
    assert (first.name, second.name) == ("lab-001", "lab-002")
    assert first.state == second.state == DesktopState.READY.value
    assert first.mac != second.mac and first.machine_id != second.machine_id
    spec = fake_host.defined_spec(first.id)
    assert spec is not None and spec.identity_text is not None
    assert f"hostname={first.hostname}" in spec.identity_text
    root = fake_host.volume_info(f"{first.id}-root.qcow2")
    assert root.backing_volume_path is not None  # a linked clone: overlay on the version


def test_full_clone_has_no_backing_file(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    desktop = DesktopService(ctx).create(template, name="full-1", clone_mode=CloneMode.FULL)
    assert fake_host.volume_info(f"{desktop.id}-root.qcow2").backing_volume_path is None


def test_delete_leaves_no_vm_no_disk_no_row(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    desktops = DesktopService(ctx)
    desktop = desktops.create(template, name="gone-1")
    desktops.delete("gone-1")
    assert all(vm.vm_id != desktop.id for vm in fake_host.list_vms())
    assert not [v for v in fake_host.list_volumes() if v.startswith(str(desktop.id))]
    with pytest.raises(NotFound, match="gone-1"):
        desktops.get("gone-1")


def test_published_version_files_are_read_only_copies(
    ctx: ServiceContext, tmp_path: Path
) -> None:
    source = make_qcow2(tmp_path / "src.qcow2")
    templates = TemplateService(ctx)
    v1 = templates.publish("t", ImageFiles(disk=source))
    v2 = templates.publish("t", ImageFiles(disk=source))
    assert (v1.number, v2.number) == (1, 2)
    assert v1.image_path != v2.image_path and Path(v1.image_path).is_file()
    assert not os.access(v1.image_path, os.W_OK) or os.geteuid() == 0
    assert Path(v1.image_path).stat().st_mode & 0o777 == 0o444


def test_agent_that_never_answers_marks_the_desktop_error_with_the_reason(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    fake_host.agent_delay_polls = 10**9
    desktops = DesktopService(ctx)
    with pytest.raises(Exception, match="guest agent"):
        desktops.create(template, name="slow-1", ready_timeout_s=0.5)
    stuck = desktops.get("slow-1")
    assert stuck.state == DesktopState.ERROR.value
    assert stuck.last_error and "guest agent" in stuck.last_error


# --- bad input: one clear error, nothing half-made -------------------------------------------


def _nothing_made(ctx: ServiceContext, driver: FakeDriver) -> None:
    assert DesktopService(ctx).list() == []
    assert driver.list_vms() == []
    assert not [v for v in driver.list_volumes() if v.endswith("-root.qcow2")]


def test_unknown_template(ctx: ServiceContext, fake_host: FakeDriver) -> None:
    with pytest.raises(NotFound, match="nosuch"):
        DesktopService(ctx).create("nosuch")
    _nothing_made(ctx, fake_host)


def test_name_collision(ctx: ServiceContext, fake_host: FakeDriver, template: str) -> None:
    desktops = DesktopService(ctx)
    kept = desktops.create(template, name="dup-1")
    with pytest.raises(Conflict, match="dup-1"):
        desktops.create(template, name="dup-1")
    assert [d.id for d in desktops.list()] == [kept.id]
    assert len(fake_host.list_vms()) == 1


def test_missing_image_file_at_publish(ctx: ServiceContext, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"nope\.qcow2"):
        TemplateService(ctx).publish("t", ImageFiles(disk=tmp_path / "nope.qcow2"))
    assert TemplateService(ctx).list_versions() == []


def test_image_file_gone_after_publish(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    (version,) = TemplateService(ctx).list_versions()
    Path(version.image_path).unlink()
    with pytest.raises(TemplateUnusable, match=re.escape(version.image_path)) as raised:
        DesktopService(ctx).create(template)
    assert f"template {template!r} version 1 cannot be used on host" in str(raised.value)
    assert isinstance(raised.value.__cause__, NotFound)
    _nothing_made(ctx, fake_host)


def test_failed_clone_on_the_hypervisor_leaves_nothing(
    ctx: ServiceContext, fake_host: FakeDriver, template: str
) -> None:
    fake_host.fail_next("create_vm.define")
    with pytest.raises(Exception, match="injected"):
        DesktopService(ctx).create(template)
    _nothing_made(ctx, fake_host)


def test_unreachable_libvirt_uri_stores_no_host(ctx: ServiceContext) -> None:
    with pytest.raises(HypervisorUnreachable, match=r"127\.0\.0\.1:1"):
        HostService(ctx).add("far", "qemu+tcp://127.0.0.1:1/system")
    assert HostService(ctx).list() == []


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"name": "Bad Name"}, InvalidInput, "hostname"),
    ({"pattern": "lab"}, InvalidInput, "naming pattern"),
    ({"version": 9}, NotFound, "9"),
    ({"host": "nosuch"}, NotFound, "nosuch"),
])
def test_bad_create_arguments(
    ctx: ServiceContext, fake_host: FakeDriver, template: str,
    kwargs: dict[str, object], error: type[Exception], message: str,
) -> None:
    with pytest.raises(error, match=message):
        DesktopService(ctx).create(template, **kwargs)  # type: ignore[arg-type]
    _nothing_made(ctx, fake_host)


def test_template_image_with_a_backing_file_is_refused(
    ctx: ServiceContext, tmp_path: Path
) -> None:
    base = make_qcow2(tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(overlay)], check=True)
    with pytest.raises(InvalidInput, match="backing file"):
        TemplateService(ctx).publish("t", ImageFiles(disk=overlay))


# --- the same factory on libvirt's test:/// driver ----------------------------------------------


def test_libvirt_test_driver_desktop_is_defined_with_metadata(
    ctx: ServiceContext, tmp_path: Path
) -> None:
    HostService(ctx).add("sim", "test:///default", storage_dir=tmp_path / "pool",
                         limits=HostLimits(memory_overcommit=8.0))
    TemplateService(ctx).publish("golden", ImageFiles(disk=make_qcow2(tmp_path / "g.qcow2")),
                                 customization=Customization.NONE)
    desktops = DesktopService(ctx)
    # test:/// has no guest agent, so the desktop stays customizing: wait_ready would time out.
    desktop = desktops.create("golden", name="sim-1", wait_ready=False)
    assert desktop.state == DesktopState.CUSTOMIZING.value
    driver = ctx.driver_for_name("sim")
    record = driver.get_vm(desktop.id)
    assert record.metadata is not None and record.metadata.desktop_name == "sim-1"
    desktops.delete("sim-1")
    assert all(vm.vm_id != desktop.id for vm in driver.list_vms())
    assert uuid.UUID(str(desktop.id)) == desktop.id
