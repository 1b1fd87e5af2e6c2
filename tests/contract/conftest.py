"""Fixtures for the driver contract suite: one ``driver`` fixture, one param per driver.

* ``fake``: the in-memory ``FakeDriver``.
* ``libvirt-test``: ``LibvirtDriver`` on libvirt's ``test:///default`` (no real VMs).
* ``libvirt-qemu``: ``LibvirtDriver`` on ``qemu:///system`` (marked ``realvm``). Outside CI it is
  skipped, with the reason, when the daemon cannot be reached; with ``CI=true`` that is a failure,
  so the tier that runs real QEMU is never silently skipped.

Every VM and volume a test makes is removed afterwards, even when the test fails.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from deskpool.domain.errors import DeskpoolError, HypervisorUnreachable, VmNotFound
from deskpool.domain.identity import new_mac
from deskpool.domain.models import CloneMode, PowerState, VmMetadata, VmSpec
from deskpool.drivers.base import HypervisorDriver, owned_volume_names
from deskpool.drivers.fake import FakeDriver
from tests.conftest import DRIVER_TEST_INSTALLATION

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
LIBVIRT_URIS = {"libvirt-test": "test:///default", "libvirt-qemu": "qemu:///system"}
BASE_VOLUME = "contract-base.qcow2"
# Not "deskpool-": tests/conftest.py removes those under /tmp when any pytest session ends,
# which would pull pools from under tests running in a concurrent session.
POOL_PREFIX = "dpcontract-"


def make_base_qcow2(path: Path, size: str = "64M") -> Path:
    """An empty qcow2 image: enough for a VM that runs without booting an OS."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        check=True, capture_output=True,
    )
    return path


def define_foreign_vm(kind: str, driver: HypervisorDriver, name: str) -> None:
    """A VM deskpool did not make (no deskpool metadata), defined behind the driver's back."""
    if isinstance(driver, FakeDriver):
        driver.add_foreign_vm(name)
        return
    import libvirt  # only here: the suite itself talks to drivers, never to libvirt

    domain_type = "test" if kind == "libvirt-test" else "qemu"
    conn = libvirt.open(LIBVIRT_URIS[kind])
    try:
        conn.defineXML(
            f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
        )
    finally:
        conn.close()


def _undefine_foreign_vm(kind: str, name: str) -> None:
    import libvirt

    conn = libvirt.open(LIBVIRT_URIS[kind])
    try:
        with suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    finally:
        conn.close()


def _remove_pools(kind: str, pool_name: str | None) -> None:
    """The libvirt driver defines persistent pools: drop this test's one (``pool_name``) and
    any of ours whose directory is gone (a run that was killed), so none pile up."""
    import libvirt

    conn = libvirt.open(LIBVIRT_URIS[kind])
    try:
        for pool in conn.listAllStoragePools(0):
            with suppress(libvirt.libvirtError):
                name = pool.name()
                if not name.startswith(POOL_PREFIX):
                    continue
                path = re.search(r"<path>([^<]+)</path>", pool.XMLDesc(0))
                if name != pool_name and (
                    # test:/// lives only in this process and never creates directories.
                    kind == "libvirt-test" or path is None or Path(path.group(1)).exists()
                ):
                    continue  # another live test's pool, maybe in a concurrent session
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
    finally:
        conn.close()


@dataclass
class ContractEnv:
    """What a contract test needs besides the driver: specs it can make and clean up."""

    kind: str
    driver: HypervisorDriver
    tmp: Path
    base_image: Path
    vm_ids: list[uuid.UUID] = field(default_factory=list)
    foreign_names: list[str] = field(default_factory=list)

    def base_volume(self) -> str:
        """The template image imported into the host (imported once per test)."""
        self.driver.import_volume(BASE_VOLUME, self.base_image)
        return BASE_VOLUME

    def spec(self, **changes: Any) -> VmSpec:
        """A fresh linked-clone spec; its id is recorded first, so teardown deletes whatever
        a create with it left behind."""
        vm_id = changes.get("vm_id") or uuid.uuid4()
        self.vm_ids.append(vm_id)
        spec = VmSpec(
            vm_id=vm_id,
            name=f"dp-contract-{vm_id.hex[:12]}",
            base_volume=BASE_VOLUME,
            clone_mode=CloneMode.LINKED,
            mac=new_mac(),
            metadata=VmMetadata(
                desktop_id=vm_id, desktop_name=f"desk-{vm_id.hex[:6]}",
                template_version_id=uuid.uuid4(),
                installation_id=DRIVER_TEST_INSTALLATION,
            ),
            memory_mib=64,
        )
        return replace(spec, **changes)

    def running_vm(self, **changes: Any) -> VmSpec:
        """A linked clone of the base volume, created and started."""
        self.base_volume()
        spec = self.spec(**changes)
        self.driver.create_vm(spec)
        self.driver.start_vm(spec.vm_id)
        return spec

    def instant_spec(self, disk: str, memory: str, **changes: Any) -> VmSpec:
        """An instant clone of a captured state (``capture_memory_state``'s two volumes)."""
        return self.spec(clone_mode=CloneMode.INSTANT, base_volume=disk,
                         memory_state_volume=memory, **changes)

    def add_foreign_vm(self) -> str:
        name = f"dp-contract-foreign-{uuid.uuid4().hex[:8]}"
        self.foreign_names.append(name)
        define_foreign_vm(self.kind, self.driver, name)
        return name


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base_qcow2(tmp_path_factory.mktemp("images") / "base.qcow2")


def _open_libvirt(kind: str, storage_dir: Path, pool_name: str) -> HypervisorDriver:
    if IN_CI:  # in CI a driver that cannot be imported is a failure, not a skip
        module = importlib.import_module("deskpool.drivers.libvirt")
    else:
        module = pytest.importorskip(
            "deskpool.drivers.libvirt", reason="the libvirt driver is not importable"
        )
    try:
        driver: HypervisorDriver = module.LibvirtDriver(
            LIBVIRT_URIS[kind], storage_dir=storage_dir, pool_name=pool_name
        )
    except HypervisorUnreachable as exc:
        if IN_CI:
            pytest.fail(f"CI=true: the {kind} contract tier must run, but {exc}")
        if kind == "libvirt-qemu":
            pytest.skip(f"qemu:///system is not reachable here ({exc}); CI=true makes this fail")
        raise
    return driver


@pytest.fixture(
    params=["fake", "libvirt-test", pytest.param("libvirt-qemu", marks=pytest.mark.realvm)]
)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HypervisorDriver]:
    kind: str = request.param
    pool_name = f"{POOL_PREFIX}{uuid.uuid4().hex[:10]}"
    if kind == "fake":
        drv: HypervisorDriver = FakeDriver()
    else:
        drv = _open_libvirt(kind, tmp_path / "pool", pool_name)
        _remove_pools(kind, None)  # stale ones only
    volumes_before = set(drv.list_volumes())
    vms_before = {vm.vm_id for vm in drv.list_vms()}
    request.node.contract_kind = kind
    try:
        yield drv
    finally:
        try:
            _sweep(drv, request, volumes_before, vms_before)
        finally:
            drv.close()
            if kind != "fake":  # even when the sweep itself failed
                env = getattr(request.node, "contract_env", None)
                for name in env.foreign_names if env else []:
                    _undefine_foreign_vm(kind, name)
                _remove_pools(kind, pool_name)


def _sweep(
    drv: HypervisorDriver, request: pytest.FixtureRequest,
    volumes_before: set[str], vms_before: set[uuid.UUID],
) -> None:
    """Delete every VM and volume the test made; fail the teardown if something stays."""
    env: ContractEnv | None = getattr(request.node, "contract_env", None)
    made = list(env.vm_ids) if env else []
    # Also anything deskpool-made that appeared without going through env.spec().
    made += [vm.vm_id for vm in drv.list_vms()
             if vm.vm_id not in vms_before and vm.metadata is not None]
    errors: list[str] = []
    for vm_id in made:
        try:
            drv.delete_vm(vm_id)
        except DeskpoolError as exc:
            errors.append(f"delete_vm({vm_id}): {exc}")
    for name in sorted(set(drv.list_volumes()) - volumes_before):
        try:
            drv.delete_volume(name)
        except DeskpoolError as exc:
            errors.append(f"delete_volume({name}): {exc}")
    if errors:
        pytest.fail("contract teardown could not clean up: " + "; ".join(errors))


@pytest.fixture
def env(
    driver: HypervisorDriver, request: pytest.FixtureRequest, tmp_path: Path, base_image: Path
) -> ContractEnv:
    contract_env = ContractEnv(
        kind=request.node.contract_kind, driver=driver, tmp=tmp_path, base_image=base_image
    )
    request.node.contract_env = contract_env  # the driver fixture's teardown reads it
    return contract_env


def assert_nothing_left(driver: HypervisorDriver, spec: VmSpec, *, name_free: bool = True) -> None:
    """The "no half-made VMs" rule: no definition, no volume named after the VM."""
    with pytest.raises(VmNotFound):
        driver.get_vm(spec.vm_id)
    assert spec.vm_id not in {vm.vm_id for vm in driver.list_vms()}
    if name_free:
        assert spec.name not in {vm.name for vm in driver.list_vms()}
    assert not set(owned_volume_names(spec.vm_id)) & set(driver.list_volumes())


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def power_of(driver: HypervisorDriver, vm_id: uuid.UUID) -> PowerState:
    return driver.get_vm(vm_id).power_state
