"""Fixtures and spec helpers shared by the fake driver's unit tests."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from deskpool.domain.errors import VmNotFound
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import CloneMode, VmMetadata, VmSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import owned_volume_names
from deskpool.drivers.fake import FakeDriver


# Fixtures are named apart from their functions, so a test module imports them without its
# parameters shadowing the import.
@pytest.fixture(scope="module", name="base_image")
def base_image_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.fixture(name="fake")
def fake_fixture(base_image: Path) -> FakeDriver:
    driver = FakeDriver()
    driver.import_volume("base.qcow2", base_image)
    return driver


def make_spec(identity: DesktopIdentity | None = None, **changes: Any) -> VmSpec:
    vm_id = identity.desktop_id if identity else uuid.uuid4()
    values: dict[str, Any] = dict(
        vm_id=vm_id, name=f"vm-{vm_id.hex[:8]}", base_volume="base.qcow2",
        clone_mode=CloneMode.LINKED, mac=identity.mac if identity else new_mac(),
        metadata=VmMetadata(desktop_id=vm_id, desktop_name="lab-001"),
        identity_text=identity.to_guest_text() if identity else None,
    )
    values.update(changes)
    return VmSpec(**values)


def make_identity() -> DesktopIdentity:
    return DesktopIdentity(uuid.uuid4(), "lab-001", new_mac(), new_machine_id())


def booted(fake: FakeDriver, identity: DesktopIdentity | None = None) -> tuple[VmSpec, GuestAgent]:
    spec = make_spec(identity or make_identity())
    fake.create_vm(spec)
    fake.start_vm(spec.vm_id)
    return spec, GuestAgent(fake, spec.vm_id)


def assert_nothing_left(fake: FakeDriver, spec: VmSpec) -> None:
    with pytest.raises(VmNotFound):
        fake.get_vm(spec.vm_id)
    assert not set(owned_volume_names(spec.vm_id)) & set(fake.list_volumes())
